"""Mask Preview math: recorded grid maps -> one map per image (a step or an aggregate) -> image resolution -> overlay."""

from __future__ import annotations

import re

import torch
from torch import Tensor

try:  # inside ComfyUI the pack is a package and sae_core its sibling
    from ..sae_core.errors import SAEInputError
except ImportError:  # imported as top-level `nodes`
    from sae_core.errors import SAEInputError

AGGREGATES = ("max", "mean", "last")
SHOW = ("mask", "score")


def recorded_maps(recorder, what: str = "mask", branch: str = "cond", image: int = 0,
                  label: str | None = None) -> tuple[list, Tensor]:
    """(step keys, [S, h, w] float32) of one image and branch, in recording order.

    "mask": 1 where detected (several chunks of the branch united); "score": the detection margin
    clamped at 0 (max over chunks; -inf where no latent was selected becomes 0).
    """
    if what not in SHOW:
        raise SAEInputError(f"show is {what!r}, expected one of {list(SHOW)}")
    branches = {r.branch for r in recorder.records if label is None or r.label == label}
    if recorder.records and branch not in branches:
        hint = (" At cfg 1 the sampler runs no uncond pass, so only 'cond' is ever recorded." if branch == "uncond"
                else " The detector's branches setting leaves this branch out.")
        raise SAEInputError(
            f"Mask Preview: branch {branch!r} recorded nothing; recorded branches: {sorted(branches)}.{hint} "
            f"Choose branch {sorted(branches)[0]!r}" if branches else f"Mask Preview: label {label!r} recorded nothing"
        )
    if what == "mask":
        keys, masks = recorder.masks(branch, image, label)
        return keys, masks.float()
    return recorder.scores(branch, image, label)


def pick_step(keys: list, maps: Tensor, step: int, aggregate: str) -> Tensor:
    """[h, w] map: the recorded step ``step`` (a sampling step index), or the aggregate when step < 0."""
    if step >= 0:
        if step not in keys:
            raise SAEInputError(
                f"step {step} was not recorded; recorded steps: {keys} (outside start/end percent nothing is "
                "recorded); use -1 to aggregate over all recorded steps"
            )
        return maps[keys.index(step)]
    if aggregate == "max":
        return maps.amax(0)
    if aggregate == "mean":
        return maps.mean(0)
    if aggregate == "last":
        return maps[-1]
    raise SAEInputError(f"aggregate is {aggregate!r}, expected one of {list(AGGREGATES)}")


def upscale(grid: Tensor, height: int, width: int) -> Tensor:
    """[..., h, w] -> [..., height, width]: pixel (y, x) takes cell (floor(y*h/height), floor(x*w/width)).

    A block's grid covers the image with equal cells (the UNet rounds odd sizes up, so the last cell may
    cover slightly less); the map is never assumed square.
    """
    h, w = grid.shape[-2:]
    ys = (torch.arange(height) * h) // height
    xs = (torch.arange(width) * w) // width
    return grid.index_select(-2, ys.to(grid.device)).index_select(-1, xs.to(grid.device))


def normalise(m: Tensor) -> Tensor:
    """Scale a non-negative map into [0, 1] by its maximum (an all-zero map stays zero)."""
    top = m.max()
    return m / top if float(top) > 0 else torch.zeros_like(m)


def parse_color(text: str) -> tuple[float, float, float]:
    """'#ff0000' or 'ff0000' -> (1.0, 0.0, 0.0)."""
    t = text.strip().lstrip("#")
    if not re.fullmatch(r"[0-9a-fA-F]{6}", t):
        raise SAEInputError(f"color is {text!r}, expected a hex colour like #ff3300")
    return tuple(int(t[i:i + 2], 16) / 255.0 for i in (0, 2, 4))


def overlay(images: Tensor, maps: Tensor, color: tuple[float, float, float], opacity: float) -> Tensor:
    """images [N, H, W, 3] in 0..1, maps [N, H, W] in 0..1 -> images tinted towards ``color`` by opacity * map."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise SAEInputError(f"images have shape {tuple(images.shape)}, expected [N, H, W, 3] (a ComfyUI IMAGE)")
    if maps.shape != images.shape[:3]:
        raise SAEInputError(f"maps have shape {tuple(maps.shape)}, expected {tuple(images.shape[:3])}")
    if not 0.0 <= opacity <= 1.0:
        raise SAEInputError(f"opacity is {opacity}, expected 0..1")
    a = (float(opacity) * maps.to(images.dtype))[..., None]
    c = torch.tensor(color, dtype=images.dtype, device=images.device)
    rgb = images[..., :3] * (1 - a) + c * a
    return torch.cat([rgb, images[..., 3:]], -1) if images.shape[-1] > 3 else rgb
