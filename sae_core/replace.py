"""Patch embedding replacement (PER): fill detected patches from non-detected patches of the same map.

Each image of a batch is one feature map (one image, one CFG branch, one step): sources are taken
only from that map. Modes:
  random  - each detected patch copies a uniformly drawn non-detected patch (the paper's; default),
            draws from a caller-seeded torch.Generator on the CPU, so results do not depend on device;
  nearest - the non-detected patch nearest in grid coordinates (Euclidean; ties -> lowest row-major index);
  mean    - the mean of all non-detected patches (accumulated in float32).
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

MODES = ("random", "nearest", "mean")


class Replacement(NamedTuple):
    values: Tensor  # [B, H, W, C] (the input object itself when nothing was replaced)
    all_detected: Tensor  # [B] bool on CPU: maps left unchanged because every patch was detected


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise SAEInputError(f"replacement mode is {mode!r}, expected one of {list(MODES)}")
    return mode


def finite_patches(values: Tensor) -> Tensor:
    """[B, H, W] bool on the CPU: patches of values [B, H, W, C] whose every channel is finite (may be sources)."""
    return torch.isfinite(values).all(-1).cpu()


def source_indices(mask: Tensor, mode: str, generator: torch.Generator | None = None,
                   eligible: Tensor | None = None) -> list[tuple[Tensor, Tensor] | None]:
    """Per map of mask [B, H, W]: (dst, src) flat row-major indices, or None when nothing to do.

    For "mean" src is every non-detected index (the caller averages them). ``eligible`` [B, H, W] bool, when given,
    restricts the sources further (non-finite patches are never copied into finite ones).
    """
    check_mode(mode)
    B, H, W = mask.shape
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
            d_rc = torch.stack([dst // W, dst % W], -1).float()
            s_rc = torch.stack([src_all // W, src_all % W], -1).float()
            dist = torch.cdist(d_rc, s_rc)  # [n_dst, n_src]
            out.append((dst, src_all[dist.argmin(-1)]))
        else:
            out.append((dst, src_all))
    return out


def replace_patches(
    values: Tensor, mask: Tensor, mode: str = "random", generator: torch.Generator | None = None
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
    pairs = source_indices(mask, mode, generator, eligible=finite_patches(values))
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
