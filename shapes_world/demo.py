"""The main job: erase a concept from the shapes model's pictures with PER and with SAE steering.

    python -m shapes_world.demo [--concept red] [--out demo_output]

From the same seeds renders the original, Patch Replacer as the pack recommends it (background sources,
presence gate, look-ahead masks) and as the paper describes it (random sources), SAE Steer SAeUron-style (scale
the concept's latents by gamma * mu) and SAE Steer sdxl-unbox-style (add -strength * mean * decoder direction on
the detected patches), writes ``comparison.png`` (one row per prompt) and ``masks_<i>.png`` (the
detection mask of every denoising step over the original picture) to the output folder, and prints the
metrics table of shapes_world/erasure.py for these prompts.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image, ImageDraw

from sae_core.intervention import Recorder, ReplaceSettings
from sae_core.steer import SteerSettings

from .erasure import PER_DEFAULT, WEIGHTS, evaluate_concept, intervention, load_world, prompt_sets
from .render import render, scheduler_timesteps

logger = logging.getLogger(__name__)

DEFAULT_CONCEPT = "red"
GAMMA = -16.0
ADD = -128.0


def _tile(img: torch.Tensor, scale: int) -> Image.Image:
    arr = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    pil = Image.fromarray(arr, "RGB")
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def _overlay(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Image [3, S, S] with the [h, w] mask drawn in magenta at half opacity."""
    m = torch.nn.functional.interpolate(mask.float()[None, None], size=img.shape[-2:], mode="nearest")[0]
    tint = torch.tensor([1.0, 0.0, 1.0])[:, None, None]
    return img * (1 - 0.5 * m) + tint * 0.5 * m


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters, broken between words (a longer word stands alone)."""
    lines, line = [], ""
    for w in text.split():
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    return lines + [line] if line else lines


def write_grid(path: Path, columns: dict[str, torch.Tensor], captions: list[str], scale: int = 4) -> None:
    names = list(columns)
    n, s = len(captions), columns[names[0]].shape[-1] * scale
    pad, head, side = 4, 28, 230
    canvas = Image.new("RGB", (side + len(names) * (s + pad) + pad, head + n * (s + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        x0 = side + pad + c * (s + pad)
        for j, text in enumerate(_wrap(name, 20)[:2]):
            draw.text((x0, 2 + 12 * j), text, fill="black")
        for i in range(n):
            canvas.paste(_tile(columns[name][i], scale), (x0, head + pad + i * (s + pad)))
    for i, cap in enumerate(captions):
        y = head + pad + i * (s + pad)
        for j, text in enumerate(_wrap(cap, 34)[:5]):
            draw.text((4, y + 12 * j), text, fill="black")
    canvas.save(path)


def write_mask_strip(path: Path, image: torch.Tensor, masks: torch.Tensor, timesteps: list[float], scale: int = 4) -> None:
    """One tile per step: the detection mask of that step over the original picture."""
    s = image.shape[-1] * scale
    pad, head = 3, 14
    canvas = Image.new("RGB", (pad + masks.shape[0] * (s + pad), head + s + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for k in range(masks.shape[0]):
        x0 = pad + k * (s + pad)
        draw.text((x0, 1), f"t={timesteps[k]:.0f}", fill="black")
        canvas.paste(_tile(_overlay(image, masks[k]), scale), (x0, head))
    canvas.save(path)


def run_demo(out_dir: str | Path = "demo_output", concept: str = DEFAULT_CONCEPT, targets: int = 4, others: int = 2,
             steps: int = 20, weights: str | Path = WEIGHTS, out: TextIO | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = load_world(weights, [concept])
    tc, oc = prompt_sets(concept, targets, others)
    methods = {
        "Patch Replacer (recommended)": PER_DEFAULT,
        "Patch Replacer (paper: random)": ReplaceSettings("random", seed=0),
        f"SAE Steer SAeUron gamma={GAMMA:g}": SteerSettings("saeuron_scale", GAMMA),
        f"SAE Steer unbox add {ADD:g}": SteerSettings("unbox_add", ADD, detected_only=True),
    }
    result, images = evaluate_concept(world, concept, tc, oc, methods, steps=steps)
    caps = tc + oc
    write_grid(out_dir / "comparison.png", images, caps)
    rec = Recorder()
    render(world.model, tc, steps=steps, interventions={world.block_for(concept): intervention(world, concept, None, rec)})
    ts = [float(t) for t in scheduler_timesteps(world.model, steps)]
    for i in range(len(tc)):
        _, masks = rec.masks("cond", i)
        write_mask_strip(out_dir / f"masks_{i}.png", images["original"][i], masks, ts)
    lines = [f"concept {concept!r}: {len(tc)} prompts with it, {len(oc)} without; {steps} DDIM steps, CFG 3; "
             f"detection IoU {result.detection_iou:.3f}",
             f"{'method':32s} {'erased':>7s} {'kept':>7s} {'PSNR dB':>8s} {'ident.':>7s} {'artifact':>8s} {'judge':>7s} "
             f"{'OOD W1':>8s}"]
    for name in methods:
        r = result.methods[name]
        lines.append(f"{name:32s} {r['erasure_rate']:7.3f} {r['preservation']:7.3f} {r['unchanged_psnr_db']:8.2f} "
                     f"{r['unchanged_identical']:7.3f} {r['artifact_rate']:8.3f} {r['artifact_rate_judge']:7.3f} "
                     f"{r['ood_distance']:8.4f}")
    lines.append(f"images: {out_dir / 'comparison.png'}, per-step masks: {out_dir / 'masks_0.png'} ...")
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.write(text)
    else:
        logger.info("\n%s", text)
    return {"detection_iou": result.detection_iou, "methods": {m: result.methods[m] for m in methods}}


def main(argv: list[str] | None = None) -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", default=DEFAULT_CONCEPT, help="a colour or shape with a shipped concept file")
    p.add_argument("--out", type=Path, default=Path("demo_output"))
    p.add_argument("--targets", type=int, default=4, help="prompts naming the concept")
    p.add_argument("--others", type=int, default=2, help="prompts without it (should stay unchanged)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    run_demo(a.out, a.concept, a.targets, a.others, a.steps, a.weights, out=sys.stdout)


if __name__ == "__main__":
    main()
