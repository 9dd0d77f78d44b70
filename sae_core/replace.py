"""Patch embedding replacement (PER): fill detected patches from non-detected patches of the same map.

Each image of a batch is one feature map (one image, one CFG branch, one step): sources are taken
only from that map. Modes:
  random  - each detected patch copies a uniformly drawn non-detected patch (the paper's; default),
            draws from a caller-seeded torch.Generator on the CPU, so results do not depend on device;
  nearest - the non-detected patch nearest in grid coordinates (Euclidean; ties -> lowest row-major index);
  mean    - the mean of all non-detected patches (accumulated in float32);
  background - a non-detected patch that no object claims: its SAE code is mostly on latents that are
            common in this map (``patch_salience``; background and texture latents cover much of a map, an
            object's only its own patches), so other objects are never copied into the hole (random and
            nearest import neighbours; mean blends them). Without codes: the patches nearest the median
            non-detected patch (distance at most the median distance). Each hole patch takes the nearest typical patch on
            its line along the background's texture direction (rows, columns or a diagonal: where neighbouring
            typical patches differ least), so stripes run on through the hole; the nearest typical patch in
            the grid when that line has none.
An empty mask returns the input tensor itself. A map that is detected everywhere has no source and
is returned unchanged; ``all_detected`` reports it. Patches holding NaN or inf are never sources (they
would spread into finite patches); a map whose every undetected patch is non-finite is left unchanged.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import Tensor

from .errors import SAEInputError

logger = logging.getLogger(__name__)

MODES = ("random", "nearest", "mean", "background")
# modes that read the patch values to choose sources (the others need only the mask)
VALUE_MODES = ("background",)


class Replacement(NamedTuple):
    values: Tensor  # [B, H, W, C] (the input object itself when nothing was replaced)
    all_detected: Tensor  # [B] bool on CPU: maps left unchanged because every patch was detected


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise SAEInputError(f"replacement mode is {mode!r}, expected one of {list(MODES)}")
    return mode


RARE = 0.2  # a latent active on fewer than this share of a map's patches codes something local (an object)
SALIENT = 0.5  # a patch whose code mass is at least this much on such rare latents belongs to an object


def patch_salience(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    """Share of each patch's code mass on latents that are rare in its own map: values, indices [B, H, W, k]
    (kept codes of a TopK SAE, or the top codes of a dense one) -> [B, H, W] float32 in [0, 1].

    Background and texture are coded by latents active over much of the map (a stripe's latent on half of it);
    objects by latents active only on their own patches. 0 = every active latent is common in this map."""
    B, H, W, k = values.shape
    v = values.float().clamp_min(0)
    active = v > 0
    idx = indices.reshape(B, -1).long()
    counts = torch.zeros(B, int(n_latents), device=v.device).scatter_add_(1, idx, active.reshape(B, -1).float())
    share = (counts / (H * W)).gather(1, idx).view(B, H, W, k)
    rare = active & (share < RARE)
    total = v.sum(-1)
    return torch.where(total > 0, (v * rare).sum(-1) / total.clamp_min(1e-30), torch.zeros_like(total))


def typical_sources(values: Tensor, src: Tensor) -> Tensor:
    """Of the flat indices ``src`` into values [N, C], the ones nearest the channel-wise median of values[src]:
    distance (float32, Euclidean) at most the median distance; non-finite patches excluded. Empty only when no
    source is finite."""
    v = values.index_select(0, src.to(values.device)).float()
    finite = torch.isfinite(v).all(-1).cpu()
    if not bool(finite.all()):  # a non-finite patch is never a source (nor part of the median)
        if not bool(finite.any()):
            return src[:0]
        src, v = src[finite], v[finite.to(v.device)]
    med = v.median(0).values
    dist = (v - med).norm(dim=-1).cpu()
    cut = dist.median()
    return src[dist <= cut]


DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))  # along rows, columns and the two diagonals (dy, dx)


def texture_direction(grid: Tensor, usable: Tensor) -> tuple[int, int]:
    """The grid direction along which neighbouring usable patches differ least (the stripes' direction of a
    striped background; any for a plain one): grid [H, W, C], usable [H, W] bool. Ties: the first of
    DIRECTIONS."""
    H, W = usable.shape
    best, best_d = None, DIRECTIONS[0]
    g = grid.float()
    for dy, dx in DIRECTIONS:
        y0, y1 = 0, H - dy
        x0, x1 = max(0, -dx), W - max(0, dx)
        if y1 <= y0 or x1 <= x0:
            continue
        a, b = g[y0:y1, x0:x1], g[y0 + dy:y1 + dy, x0 + dx:x1 + dx]
        both = (usable[y0:y1, x0:x1] & usable[y0 + dy:y1 + dy, x0 + dx:x1 + dx]).to(g.device)
        n = int(both.sum())
        if n == 0:
            continue
        cost = float(((a - b).pow(2).sum(-1) * both).sum()) / n
        if best is None or cost < best:
            best, best_d = cost, (dy, dx)
    return best_d


def _along(dst: Tensor, usable: Tensor, direction: tuple[int, int], fallback: Tensor, W: int) -> Tensor:
    """For each flat index in dst the nearest usable patch on its line through ``direction`` (both ways; ties
    to the lower index), else its entry of ``fallback``."""
    H = usable.shape[0]
    dy, dx = direction
    use = usable.tolist()
    out = []
    for n, p in enumerate(dst.tolist()):
        r, c = divmod(p, W)
        found = None
        for k in range(1, max(H, W)):
            hits = [q for q in ((r - k * dy, c - k * dx), (r + k * dy, c + k * dx))
                    if 0 <= q[0] < H and 0 <= q[1] < W and use[q[0]][q[1]]]
            if hits:
                found = min(y * W + x for y, x in hits)
                break
        out.append(found if found is not None else int(fallback[n]))
    return torch.tensor(out, dtype=torch.long)


def _nearest(dst: Tensor, src: Tensor, W: int) -> Tensor:
    """For each flat index in dst the nearest flat index of src in grid coordinates (ties: lowest index)."""
    d_rc = torch.stack([dst // W, dst % W], -1).float()
    s_rc = torch.stack([src // W, src % W], -1).float()
    return src[torch.cdist(d_rc, s_rc).argmin(-1)]


def background_sources(values: Tensor, src: Tensor, salience: Tensor | None) -> Tensor:
    """The sources of mode "background" among the flat indices ``src`` into values [N, C]: finite patches that
    are not salient (``salience`` [N], see patch_salience); without salience, or when every source is salient,
    the ones nearest the median patch (``typical_sources``)."""
    if salience is not None:
        ok = (salience.reshape(-1).index_select(0, src.to(salience.device)) < SALIENT).cpu()
        finite = torch.isfinite(values.index_select(0, src.to(values.device))).all(-1).cpu()
        calm = src[ok & finite]
        if calm.numel():
            return calm
    return typical_sources(values, src)


def texture_sources(dst: Tensor, grid: Tensor, usable: Tensor) -> Tensor:
    """For each flat index in dst the source of mode "background" among ``usable`` [H, W] patches of grid
    [H, W, C]: the nearest usable patch along the texture's direction (a stripe continues through the hole),
    else the nearest usable patch. ``usable`` must have at least one patch."""
    H, W = usable.shape
    src = torch.nonzero(usable.reshape(-1).cpu()).flatten()
    direction = texture_direction(grid, usable)
    return _along(dst, usable.cpu(), direction, _nearest(dst, src, W), W)


def finite_patches(values: Tensor) -> Tensor:
    """[B, H, W] bool on the CPU: patches of values [B, H, W, C] whose every channel is finite (may be sources)."""
    return torch.isfinite(values).all(-1).cpu()


def source_indices(mask: Tensor, mode: str, generator: torch.Generator | None = None,
                   values: Tensor | None = None, salience: Tensor | None = None,
                   eligible: Tensor | None = None) -> list[tuple[Tensor, Tensor] | None]:
    """Per map of mask [B, H, W]: (dst, src) flat row-major indices, or None when nothing to do.

    For "mean" src is every non-detected index (the caller averages them). "background" needs ``values``
    [B, H, W, C] (the map the sources are copied from) and takes ``salience`` [B, H, W] (patch_salience).
    ``eligible`` [B, H, W] bool, when given, restricts the sources further (non-finite patches are never copied
    into finite ones).
    """
    check_mode(mode)
    B, H, W = mask.shape
    if mode in VALUE_MODES and (values is None or tuple(values.shape[:3]) != (B, H, W)):
        raise ValueError(f"source_indices: mode {mode!r} needs values [B, {H}, {W}, C], got "
                         f"{None if values is None else tuple(values.shape)}")
    flat = mask.reshape(B, H * W).cpu()
    ok = None if eligible is None else eligible.reshape(B, H * W).cpu()
    out: list[tuple[Tensor, Tensor] | None] = []
    for b in range(B):
        dst = torch.nonzero(flat[b]).flatten()
        src_all = torch.nonzero(~flat[b] if ok is None else ~flat[b] & ok[b]).flatten()
        if dst.numel() == 0 or src_all.numel() == 0:
            out.append(None)
            continue
        if mode == "random":
            pick = torch.randint(src_all.numel(), (dst.numel(),), generator=generator)
            out.append((dst, src_all[pick]))
        elif mode == "nearest":
            out.append((dst, _nearest(dst, src_all, W)))
        elif mode == "background":
            typical = background_sources(values[b].reshape(H * W, -1), src_all,
                                         None if salience is None else salience[b])
            if typical.numel() == 0:
                out.append(None)
                continue
            usable = torch.zeros(H * W, dtype=torch.bool)
            usable[typical] = True
            out.append((dst, texture_sources(dst, values[b], usable.view(H, W))))
        else:
            out.append((dst, src_all))
    return out


def replace_patches(
    values: Tensor, mask: Tensor, mode: str = "random", generator: torch.Generator | None = None,
    salience: Tensor | None = None,
) -> Replacement:
    """values [B, H, W, C], mask [B, H, W] bool -> detected patches filled from non-detected ones."""
    if values.ndim != 4 or mask.shape != values.shape[:3]:
        raise SAEInputError(
            f"replace_patches: values {tuple(values.shape)} must be [B, H, W, C] and mask {tuple(mask.shape)} "
            "must be [B, H, W] with the same B, H, W"
        )
    B, H, W, C = values.shape
    all_detected = mask.reshape(B, -1).all(-1).cpu()
    if not bool(mask.any()):
        return Replacement(values, all_detected)
    pairs = source_indices(mask, mode, generator, values if mode in VALUE_MODES else None,
                           salience if mode in VALUE_MODES else None, eligible=finite_patches(values))
    if all(p is None for p in pairs):
        logger.debug("PER: every patch detected in all %d map(s); nothing to copy from, left unchanged", B)
        return Replacement(values, all_detected)
    out = values.clone()
    flat_in = values.reshape(B, H * W, C)
    flat_out = out.view(B, H * W, C)
    for b, p in enumerate(pairs):
        if p is None:
            continue
        dst, src = (t.to(values.device) for t in p)
        if mode == "mean":
            fill = flat_in[b, src].float().mean(0).to(values.dtype)
            flat_out[b, dst] = fill.expand(dst.numel(), C)
        else:
            flat_out[b, dst] = flat_in[b, src]
    if bool(all_detected.any()):
        logger.debug("PER: %d of %d map(s) fully detected; left unchanged", int(all_detected.sum()), B)
    return Replacement(out, all_detected)
