"""Patch embedding replacement (PER): fill detected patches from non-detected patches of the same map.

Each image of a batch is one feature map (one image, one CFG branch, one step): sources are taken
only from that map. Modes:
  random  - each detected patch copies a uniformly drawn non-detected patch (the paper's; default),
            draws from a caller-seeded torch.Generator on the CPU, so results do not depend on device;
  nearest - the non-detected patch nearest in grid coordinates (Euclidean; ties -> lowest row-major index);
  mean    - the mean of all non-detected patches (accumulated in float32);
  background - the nearest (in grid coordinates) of the map's *typical* non-detected patches: those whose
            distance to the channel-wise median of the non-detected patches is at most the median distance.
            Background usually fills most of a map, so the median lies in it and other objects, far from
            it, are never copied into the hole (random and nearest import neighbours; mean blends them).
An empty mask returns the input tensor itself. A map that is detected everywhere has no source and
is returned unchanged; ``all_detected`` reports it.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MODES = ("random", "nearest", "mean", "background")
# modes that read the patch values to choose sources (the others need only the mask)
VALUE_MODES = ("background",)


class Replacement(NamedTuple):
    values: Tensor  # [B, H, W, C] (the input object itself when nothing was replaced)
    all_detected: Tensor  # [B] bool on CPU: maps left unchanged because every patch was detected


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"replacement mode is {mode!r}, expected one of {list(MODES)}")
    return mode


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


def _nearest(dst: Tensor, src: Tensor, W: int) -> Tensor:
    """For each flat index in dst the nearest flat index of src in grid coordinates (ties: lowest index)."""
    d_rc = torch.stack([dst // W, dst % W], -1).float()
    s_rc = torch.stack([src // W, src % W], -1).float()
    return src[torch.cdist(d_rc, s_rc).argmin(-1)]


def source_indices(mask: Tensor, mode: str, generator: torch.Generator | None = None,
                   values: Tensor | None = None) -> list[tuple[Tensor, Tensor] | None]:
    """Per map of mask [B, H, W]: (dst, src) flat row-major indices, or None when nothing to do.

    For "mean" src is every non-detected index (the caller averages them). "background" needs ``values``
    [B, H, W, C] (the map the sources are copied from).
    """
    check_mode(mode)
    B, H, W = mask.shape
    if mode in VALUE_MODES and (values is None or tuple(values.shape[:3]) != (B, H, W)):
        raise ValueError(f"source_indices: mode {mode!r} needs values [B, {H}, {W}, C], got "
                         f"{None if values is None else tuple(values.shape)}")
    flat = mask.reshape(B, H * W).cpu()
    out: list[tuple[Tensor, Tensor] | None] = []
    for b in range(B):
        dst = torch.nonzero(flat[b]).flatten()
        src_all = torch.nonzero(~flat[b]).flatten()
        if dst.numel() == 0 or src_all.numel() == 0:
            out.append(None)
            continue
        if mode == "random":
            pick = torch.randint(src_all.numel(), (dst.numel(),), generator=generator)
            out.append((dst, src_all[pick]))
        elif mode == "nearest":
            out.append((dst, _nearest(dst, src_all, W)))
        elif mode == "background":
            typical = typical_sources(values[b].reshape(H * W, -1), src_all)
            out.append(None if typical.numel() == 0 else (dst, _nearest(dst, typical, W)))
        else:
            out.append((dst, src_all))
    return out


def replace_patches(
    values: Tensor, mask: Tensor, mode: str = "random", generator: torch.Generator | None = None
) -> Replacement:
    """values [B, H, W, C], mask [B, H, W] bool -> detected patches filled from non-detected ones."""
    if values.ndim != 4 or mask.shape != values.shape[:3]:
        raise ValueError(
            f"replace_patches: values {tuple(values.shape)} must be [B, H, W, C] and mask {tuple(mask.shape)} "
            "must be [B, H, W] with the same B, H, W"
        )
    B, H, W, C = values.shape
    all_detected = mask.reshape(B, -1).all(-1).cpu()
    if not bool(mask.any()):
        return Replacement(values, all_detected)
    pairs = source_indices(mask, mode, generator, values if mode in VALUE_MODES else None)
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
