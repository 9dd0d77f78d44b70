"""Real Mask Preview / Compare ui payloads from the pack's core on the planted synthetic world (no checkpoint needed).

A concept direction is planted in a growing region over six "sampling steps"; the concept is learned, detected
and erased with BlockIntervention (PER and SAeUron steering), the recorder's masks go through the same
nodes.masks / nodes.ui_payload functions Mask Preview calls, and the edited maps are rendered as images for
Compare. tools/browser_check.py delivers these payloads to the frontend as "executed" events, which is how the
frontend receives a node's ui output after a real run.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
from einops import rearrange  # noqa: E402
from PIL import Image  # noqa: E402

from nodes.masks import overlay, recorded_maps, upscale  # noqa: E402
from nodes.ui_payload import compare_payload, mask_step_payload  # noqa: E402
from sae_core.concepts import ConceptStatsAccumulator, SelectionRule, build_concept_dictionary  # noqa: E402
from sae_core.detect import ConceptDetector, DetectionSettings  # noqa: E402
from sae_core.intervention import BlockIntervention, Recorder, ReplaceSettings, StepInfo  # noqa: E402
from sae_core.steer import SteerSettings  # noqa: E402
from sae_core.synthetic import coverage_regions, planted_maps, planted_sae  # noqa: E402

GRID = (12, 16)
SCALE = 24
STEPS = 6


def _render(along: torch.Tensor) -> torch.Tensor:
    """[H, W] concept component -> an RGB picture [H*S, W*S, 3] in 0..1 (smooth, like a decoded image)."""
    v = (along.abs() / 3).clamp(0, 1)[None, None]
    v = torch.nn.functional.interpolate(v, scale_factor=SCALE, mode="bicubic", align_corners=False)[0, 0].clamp(0, 1)
    return torch.stack([0.15 + 0.8 * v, 0.25 + 0.5 * v, 0.45 - 0.3 * v], -1).clamp(0, 1)


def _save_preview(img: torch.Tensor, out_dir: str, name: str) -> dict:
    arr = (img.clamp(0, 1).numpy() * 255).round().astype("uint8")
    Image.fromarray(arr, "RGB").save(os.path.join(out_dir, name))
    return {"filename": name, "subfolder": "", "type": "temp"}


def build(out_dir: str) -> tuple[dict, dict]:
    """Write the PNGs into ``out_dir`` (ComfyUI's temp folder); return (Mask Preview output, Compare output)."""
    torch.manual_seed(0)
    H, W = GRID
    sae, u = planted_sae(d=64, M=256)
    acc = ConceptStatsAccumulator(sae.cfg.n_latents)
    for t in (999.0, 500.0, 1.0):
        with_c = planted_maps(4, H, W, u, seed=11, region=coverage_regions(4, H, W, 0.2, seed=11))
        without = planted_maps(4, H, W, u, seed=12, region=torch.zeros(4, H, W, dtype=torch.bool))
        acc.add("planted", t, sae.encode(rearrange(with_c.block_out, "b c h w -> b h w c")))
        acc.add("background", t, sae.encode(rearrange(without.block_out, "b c h w -> b h w c")))
    concept = build_concept_dictionary(acc.stats(), SelectionRule("top_n", top_n=1), keep=["planted"],
                                       sae_fingerprint=sae.fingerprint())
    detector = ConceptDetector(concept, DetectionSettings(), sae=sae)

    recorder = Recorder()
    per = BlockIntervention(sae, detector, ReplaceSettings("random", seed=0), recorder=recorder)
    steer = BlockIntervention(sae, detector, SteerSettings("saeuron_scale", -10.0), recorder=Recorder())
    last = None
    for s in range(STEPS):  # the "object" grows over the steps, as it forms during denoising
        region = torch.zeros(1, H, W, dtype=torch.bool)
        region[0, 3:4 + s, 4:6 + 2 * s] = True
        maps = planted_maps(1, H, W, u, seed=20 + s, region=region)
        info = StepInfo(999.0 - s * 180.0, chunks=(0,), step_index=s)
        last = (maps, per(None, maps.block_out, info), steer(None, maps.block_out, info))
    maps, y_per, y_steer = last
    along = lambda t: torch.einsum("bchw,c->bhw", t, u)[0]  # noqa: E731
    original, erased, steered = _render(along(maps.block_out)), _render(along(y_per)), _render(along(y_steer))

    keys, masks = recorded_maps(recorder, "mask", "cond", image=0)
    images = original[None]
    color, opacity = (1.0, 0.125, 0.125), 0.5
    full = upscale(masks.amax(0)[None], images.shape[1], images.shape[2])
    mask_out = {"images": [_save_preview(overlay(images, full, color, opacity)[0], out_dir, "sae_demo_overlay.png")],
                "animated": [False],
                **mask_step_payload(images, [(keys, masks)], color, opacity, "cond", "mask", out_dir)}
    compare_out = {"images": [_save_preview(torch.cat([original, erased, steered], 1), out_dir, "sae_demo_grid.png")],
                   "animated": [False],
                   **compare_payload([original[None], erased[None], steered[None]],
                                     ["original", "Patch Replacer", "SAE Steer"], out_dir)}
    return mask_out, compare_out


if __name__ == "__main__":
    # python tools/demo_payload.py <ComfyUI temp folder> <payload.json>
    mask_out, compare_out = build(sys.argv[1])
    pathlib.Path(sys.argv[2]).write_text(json.dumps({"mask": mask_out, "compare": compare_out}))
