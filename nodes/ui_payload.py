"""Frontend payloads of Mask Preview (per-step masks for the step scrubber) and Compare (branches for the slider).

Pure: Pillow and torch only, no ComfyUI import; the nodes pass ComfyUI's temp directory. The contract is
the docstrings of the two payload functions below; js/sae_logic.js parses and validates it
(parseMaskPayload, parseComparePayload) and tests/test_ui_payload.py and the js tests hold both ends to it.
"""

from __future__ import annotations

import os
import secrets

import numpy as np
from PIL import Image
from torch import Tensor

try:  # inside ComfyUI the pack is a package and sae_core its sibling
    from ..sae_core.errors import SAEInputError
    from ..sae_core.files import atomic_write
except ImportError:  # imported as top-level `nodes`
    from sae_core.errors import SAEInputError
    from sae_core.files import atomic_write

MASK_KEY = "sae_mask_steps"
COMPARE_KEY = "sae_compare"
MAX_STEPS = 1000  # more recorded steps than this are not sent (each is one small PNG)


def _ref(filename: str, subfolder: str, folder_type: str) -> dict:
    return {"filename": filename, "subfolder": subfolder, "type": folder_type}


def _prefix() -> str:
    return "sae_" + secrets.token_hex(4)


def _save_rgb(img: Tensor, path: str) -> tuple[int, int]:
    arr = (img[..., :3].detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    atomic_write(path, lambda tmp: Image.fromarray(arr, "RGB").save(tmp, format="PNG", compress_level=1),
                 what="preview image")
    return arr.shape[1], arr.shape[0]


def mask_step_payload(images: Tensor, per_image: list[tuple[list, Tensor]], color: tuple[float, float, float],
                      opacity: float, branch: str, show: str, out_dir: str, subfolder: str = "",
                      folder_type: str = "temp") -> dict:
    """Write the plain images and one RGBA PNG per recorded step; return ``{MASK_KEY: [entry per image]}``.

    ``per_image[i] = (step keys, maps [S, h, w] in 0..1)`` for image i of ``images`` [N, H, W, C]. A mask PNG is
    the map at grid resolution (h x w), coloured ``color`` with alpha = opacity * map, to be drawn over the
    image scaled without smoothing. Steps beyond MAX_STEPS are dropped (``truncated`` says so).
    """
    if len(per_image) != images.shape[0]:
        raise SAEInputError(f"mask_step_payload: {len(per_image)} recorded map sets for {images.shape[0]} images; "
                         "expected one per image")
    if not 0.0 <= opacity <= 1.0:
        raise SAEInputError(f"mask_step_payload: opacity is {opacity}, expected 0..1")
    target = os.path.join(out_dir, subfolder)
    os.makedirs(target, exist_ok=True)
    rgb = np.array([round(c * 255) for c in color], dtype=np.uint8)
    prefix = _prefix()
    entries = []
    for i, (keys, maps) in enumerate(per_image):
        if maps.ndim != 3 or maps.shape[0] != len(keys):
            raise SAEInputError(f"mask_step_payload: image {i} has maps of shape {tuple(maps.shape)} for {len(keys)} "
                             "steps; expected [steps, h, w]")
        base_name = f"{prefix}_{i:03d}_image.png"
        width, height = _save_rgb(images[i], os.path.join(target, base_name))
        n = min(len(keys), MAX_STEPS)
        masks = []
        for s in range(n):
            m = maps[s].detach().float().clamp(0, 1).cpu().numpy()
            rgba = np.empty(m.shape + (4,), dtype=np.uint8)
            rgba[..., :3] = rgb
            rgba[..., 3] = np.round(m * opacity * 255.0).astype(np.uint8)
            name = f"{prefix}_{i:03d}_step{s:04d}.png"
            atomic_write(os.path.join(target, name),
                         lambda tmp, rgba=rgba: Image.fromarray(rgba, "RGBA").save(tmp, format="PNG", compress_level=1),
                         what="mask preview image")
            masks.append(_ref(name, subfolder, folder_type))
        entries.append({
            "image": i, "width": width, "height": height, "grid": [int(maps.shape[1]), int(maps.shape[2])],
            "steps": [int(k) if float(k).is_integer() else float(k) for k in keys[:n]],
            "base": _ref(base_name, subfolder, folder_type), "masks": masks, "branch": branch, "show": show,
            "truncated": len(keys) > n,
        })
    return {MASK_KEY: entries}


def compare_payload(images: list[Tensor], labels: list[str], out_dir: str, subfolder: str = "",
                    folder_type: str = "temp") -> dict:
    """Write the first image of each branch; return ``{COMPARE_KEY: [{"label", "image": ref, width, height}]}``
    plus ``a_images`` / ``b_images`` (the first two branches), the keys the newer frontends' core image-compare
    widget reads from a node's output."""
    if len(images) != len(labels) or len(images) < 2:
        raise SAEInputError(f"compare_payload: {len(images)} images and {len(labels)} labels; expected two or three of each")
    target = os.path.join(out_dir, subfolder)
    os.makedirs(target, exist_ok=True)
    prefix = _prefix()
    out = []
    for j, (img, label) in enumerate(zip(images, labels, strict=True)):
        name = f"{prefix}_branch{j}.png"
        width, height = _save_rgb(img[0], os.path.join(target, name))
        out.append({"label": str(label), "image": _ref(name, subfolder, folder_type), "width": width, "height": height})
    return {COMPARE_KEY: out, "a_images": [out[0]["image"]], "b_images": [out[1]["image"]]}
