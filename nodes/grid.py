"""Compare: a labelled side-by-side grid of two or three IMAGE batches ([N, H, W, C] floats in 0..1)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

try:  # inside ComfyUI the pack is a package and sae_core its sibling
    from ..sae_core.errors import SAEInputError
except ImportError:  # imported as top-level `nodes`
    from sae_core.errors import SAEInputError

GAP = 4  # pixels between panels
BAR = 24  # label bar height


def _fit_height(img: Tensor, height: int) -> Tensor:
    """[N, H, W, C] resized (bilinear) to ``height`` keeping the aspect ratio; unchanged when equal."""
    if img.shape[1] == height:
        return img
    width = max(1, round(img.shape[2] * height / img.shape[1]))
    x = F.interpolate(img.movedim(-1, 1).float(), size=(height, width), mode="bilinear", align_corners=False)
    return x.movedim(1, -1).clamp(0, 1).to(img.dtype)


def _label_bar(width: int, text: str) -> Tensor:
    bar = Image.new("RGB", (width, BAR), (24, 24, 24))
    if text:
        draw = ImageDraw.Draw(bar)
        font = ImageFont.load_default()
        draw.text((6, 5), text, fill=(240, 240, 240), font=font)
    return torch.from_numpy(np.asarray(bar, dtype=np.float32) / 255.0)


def compare_grid(images: list[Tensor], labels: list[str]) -> Tensor:
    """[N, BAR + H, sum(W_i) + GAP * (k - 1), 3]: panel i shows images[i] under labels[i].

    H is the first input's height (others are resized to it); N is the largest batch, smaller batches
    repeat their last image.
    """
    if not 2 <= len(images) <= 3:
        raise SAEInputError(f"Compare takes 2 or 3 images, got {len(images)}")
    if len(labels) != len(images):
        raise SAEInputError(f"{len(labels)} labels for {len(images)} images")
    for i, img in enumerate(images):
        if img.ndim != 4 or img.shape[-1] not in (3, 4):
            raise SAEInputError(f"image {i + 1} has shape {tuple(img.shape)}, expected [N, H, W, 3] (a ComfyUI IMAGE)")
    height = images[0].shape[1]
    panels = [_fit_height(img[..., :3], height) for img in images]
    n = max(p.shape[0] for p in panels)
    rows = []
    for b in range(n):
        cols = []
        for i, p in enumerate(panels):
            tile = p[min(b, p.shape[0] - 1)]
            col = torch.cat([_label_bar(tile.shape[1], labels[i]).to(tile), tile], 0)
            if cols:
                cols.append(torch.ones(col.shape[0], GAP, 3, dtype=col.dtype))
            cols.append(col)
        rows.append(torch.cat(cols, 1))
    return torch.stack(rows)
