"""DDIM sampling with classifier-free guidance from a shapes-world checkpoint; grid PNG writer.

    python -m shapes_world.sample --ckpt shapes_world/weights --prompt "a red circle" --n 8 --out x.png
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .model import ShapesModel, load_model

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample(
    model: ShapesModel, captions: list[str], seed: int = 0, steps: int = 20, cfg: float = 3.0,
    noise: torch.Tensor | None = None, denoised_fill=None,
) -> torch.Tensor:
    """Images [B, 3, S, S] in [0, 1] for B captions; deterministic in (weights, captions, seed, steps, cfg).

    Each model call runs the batch as [cond rows; uncond rows]; cfg = 1 skips the unconditional rows.
    The starting noise is drawn from a CPU generator seeded with `seed` unless `noise` is given.
    `denoised_fill` (sae_core.denoised.DenoisedFill) sees the CFG-combined prediction of every step.
    """
    if steps < 1:
        raise ValueError(f"sample: steps={steps}, expected at least 1 DDIM step")
    if not captions:
        raise ValueError("sample: no captions given; pass at least one (\"\" samples unconditionally)")
    device = next(model.parameters()).device
    b, s = len(captions), model.cfg.sample_size
    if noise is None:
        noise = torch.randn((b, 3, s, s), generator=torch.Generator().manual_seed(int(seed)))
    elif noise.shape != (b, 3, s, s):
        raise ValueError(f"sample: noise has shape {tuple(noise.shape)}, expected {(b, 3, s, s)}")
    x = noise.to(device)
    sched = model.ddim_scheduler()
    sched.set_timesteps(steps)
    use_cfg = cfg != 1.0
    hidden = model.encode_text(list(captions) + ([""] * b if use_cfg else []))
    for t in sched.timesteps:
        x_in = torch.cat([x, x]) if use_cfg else x
        eps = model(x_in, t.expand(x_in.shape[0]).to(device), hidden)
        if use_cfg:
            cond, uncond = eps.chunk(2)
            eps = uncond + cfg * (cond - uncond)
        if denoised_fill is not None:
            eps = denoised_fill.fill_model_output(eps, x, sched.alphas_cumprod[int(t)])
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return ((x + 1) / 2).clamp(0, 1).cpu()


def to_grid(images: torch.Tensor, rows: int, scale: int = 4, pad: int = 1) -> Image.Image:
    """Images [B, 3, H, W] in [0, 1] laid out in `rows` rows, upscaled with nearest neighbour."""
    b, _, h, w = images.shape
    cols = -(-b // rows)
    canvas = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(b):
        r, c = divmod(i, cols)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="directory with model.safetensors + config.json")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several rows")
    p.add_argument("--n", type=int, default=8, help="images per prompt (one row each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    model, config = load_model(a.ckpt)
    captions = [c for c in a.prompt for _ in range(a.n)]
    images = sample(model, captions, seed=a.seed, steps=a.steps, cfg=a.cfg)
    to_grid(images, rows=len(a.prompt), scale=a.scale).save(a.out)
    logger.info("wrote %s (%d prompts x %d, step %s)", a.out, len(a.prompt), a.n, config.get("step"))


if __name__ == "__main__":
    main()
