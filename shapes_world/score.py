"""Prompt adherence of generated images, read by the per-pixel evaluator.

    python -m shapes_world.score --ckpt /path/to/checkpoint --n 64

Per image: each named object (colour, shape) counts as drawn when at least `min_pixels` pixels carry
both its shape and its colour label; an extra colour is a colour the caption does not name covering at
least `min_pixels` pixels; the background is right when the mean grey level of the pixels labelled
background falls in the named band (black < 0.25 <= grey <= 0.75 < white).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch

from .evaluator import PixelEvaluator, load_evaluator
from .scenes import COLOURS, SHAPES, generate_scenes, parse_caption

logger = logging.getLogger(__name__)


class Adherence(NamedTuple):
    objects_drawn: float  # share of named objects found with the right shape and colour
    colours_drawn: float  # share of named objects whose colour appears (any shape)
    all_objects: float  # share of images with every named object drawn
    extra_colour: float  # share of images with an unnamed colour
    background_right: float  # share of images whose background level matches the caption
    exact: float  # share of images with all objects, no extra colour and the right background


def _background_word(level: float) -> str:
    return "black" if level < 0.25 else ("white" if level > 0.75 else "grey")


@torch.no_grad()
def prompt_adherence(
    evaluator: PixelEvaluator, images: torch.Tensor, captions: list[str], min_pixels: int = 8
) -> Adherence:
    if images.shape[0] != len(captions):
        raise ValueError(f"prompt_adherence: {images.shape[0]} images but {len(captions)} captions; pass one each")
    shape_map, colour_map = evaluator.label(images)
    n_obj = n_drawn = n_col = n_all = n_extra = n_bg = n_exact = 0
    for i, caption in enumerate(captions):
        parsed = parse_caption(caption)
        sm, cm = shape_map[i], colour_map[i]
        drawn = [int(((sm == SHAPES.index(s) + 1) & (cm == COLOURS.index(c) + 1)).sum()) >= min_pixels
                 for c, s in parsed.objects]
        col = [int((cm == COLOURS.index(c) + 1).sum()) >= min_pixels for c, _ in parsed.objects]
        named = {COLOURS.index(c) + 1 for c, _ in parsed.objects}
        extra = any(int((cm == k).sum()) >= min_pixels for k in range(1, len(COLOURS) + 1) if k not in named)
        bg = sm == 0
        level = float(images[i].mean(0)[bg].mean()) if bool(bg.any()) else 0.5
        bg_ok = parsed.background is None or _background_word(level) == parsed.background
        n_obj += len(drawn)
        n_drawn += sum(drawn)
        n_col += sum(col)
        n_all += all(drawn)
        n_extra += extra
        n_bg += bg_ok
        n_exact += all(drawn) and not extra and bg_ok
    n = len(captions)
    return Adherence(n_drawn / n_obj, n_col / n_obj, n_all / n, n_extra / n, n_bg / n, n_exact / n)


def main(argv: list[str] | None = None) -> None:
    from .model import load_model
    from .sample import sample, to_grid

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--evaluator", type=Path, default=None, help="directory with evaluator weights (default: shipped)")
    p.add_argument("--n", type=int, default=64, help="number of held-out captions to sample")
    p.add_argument("--caption-seed", type=int, default=20_000_003)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", type=Path, default=None, help="also write the samples as a grid PNG")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    model, config = load_model(a.ckpt)
    evaluator = load_evaluator(a.evaluator) if a.evaluator else load_evaluator()
    captions = generate_scenes(a.n, seed=a.caption_seed).captions
    images = sample(model, captions, seed=a.seed, steps=a.steps, cfg=a.cfg)
    result = prompt_adherence(evaluator, images, captions)
    if a.grid:
        to_grid(images, rows=max(1, a.n // 8)).save(a.grid)
    logger.info("step %s cfg %.1f: %s", config.get("step"), a.cfg, json.dumps(result._asdict()))


if __name__ == "__main__":
    main()
