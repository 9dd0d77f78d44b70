"""Per-pixel evaluator: a small conv net labelling every pixel with shape class and colour class.

Trained only on generator scenes (with noise augmentation so that imperfect generated images are
still read). Train and report held-out accuracy:

    python -m shapes_world.evaluator --steps 1500 --threads 1 --out shapes_world/weights
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sae_core.mixins import DictRoundTrip

from .scenes import COLOURS, SHAPES, generate_scenes

logger = logging.getLogger(__name__)

FORMAT = "shapes_world.evaluator/1"
N_SHAPE = 1 + len(SHAPES)  # class 0 = background
N_COLOUR = 1 + len(COLOURS)
DEFAULT_DIR = Path(__file__).resolve().parent / "weights"


@dataclass
class EvaluatorConfig(DictRoundTrip):
    width: int = 32
    groups: int = 8


def _block(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
    )


class Labels(NamedTuple):
    shape_logits: torch.Tensor  # [B, 1 + len(SHAPES), H, W]
    colour_logits: torch.Tensor  # [B, 1 + len(COLOURS), H, W]


class PixelEvaluator(nn.Module):
    """Three-level conv U-Net; input images [B, 3, H, W] in [0, 1] with H, W divisible by 4."""

    def __init__(self, cfg: EvaluatorConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or EvaluatorConfig()
        w, g = cfg.width, cfg.groups
        self.enc0 = _block(3, w, g)
        self.enc1 = _block(w, 2 * w, g)
        self.enc2 = _block(2 * w, 2 * w, g)
        self.dec1 = _block(4 * w, 2 * w, g)
        self.dec0 = _block(3 * w, w, g)
        self.head = nn.Conv2d(w, N_SHAPE + N_COLOUR, 1)

    def forward(self, images: torch.Tensor) -> Labels:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % 4 or images.shape[3] % 4:
            raise ValueError(
                f"PixelEvaluator: images have shape {tuple(images.shape)}, expected [B, 3, H, W] with H and W "
                "divisible by 4, values in [0, 1]"
            )
        x = images * 2 - 1
        h0 = self.enc0(x)
        h1 = self.enc1(F.avg_pool2d(h0, 2))
        h2 = self.enc2(F.avg_pool2d(h1, 2))
        d1 = self.dec1(torch.cat([F.interpolate(h2, scale_factor=2.0, mode="nearest"), h1], 1))
        d0 = self.dec0(torch.cat([F.interpolate(d1, scale_factor=2.0, mode="nearest"), h0], 1))
        out = self.head(d0)
        return Labels(out[:, :N_SHAPE], out[:, N_SHAPE:])

    @torch.no_grad()
    def label(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shape_map, colour_map), each [B, H, W] long in the generator's label convention."""
        out = self(images)
        return out.shape_logits.argmax(1), out.colour_logits.argmax(1)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-image Gaussian pixel noise (sigma up to 0.1) and a brightness shift, to mimic generated images."""
    b = images.shape[0]
    sigma = 0.1 * torch.rand(b, 1, 1, 1, generator=gen)
    shift = 0.05 * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
    return (images + sigma * torch.randn(images.shape, generator=gen) + shift).clamp(0, 1)


class Accuracy(NamedTuple):
    shape_pixel: float  # share of all pixels with the right shape class (background included)
    colour_pixel: float
    shape_foreground: float  # same, over pixels that belong to an object in the ground truth
    colour_foreground: float
    both_foreground: float  # object pixels with shape and colour both right


@torch.no_grad()
def evaluate(model: PixelEvaluator, n: int = 1024, seed: int = 10_000_019, noise: bool = False) -> Accuracy:
    """Pixel accuracies on n held-out generator scenes (a seed the trainer never draws)."""
    model.eval()
    s = generate_scenes(n, seed=seed)
    images = augment(s.images, torch.Generator().manual_seed(seed)) if noise else s.images
    shape_pred, colour_pred = model.label(images)
    fg = s.shape_map > 0
    ok_s, ok_c = shape_pred == s.shape_map, colour_pred == s.colour_map
    return Accuracy(
        ok_s.float().mean().item(), ok_c.float().mean().item(), ok_s[fg].float().mean().item(),
        ok_c[fg].float().mean().item(), (ok_s & ok_c)[fg].float().mean().item(),
    )


def save_evaluator(model: PixelEvaluator, directory: str | os.PathLike, meta: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(directory / "evaluator.safetensors"), metadata={"format": FORMAT})
    info = {"format": FORMAT, "config": model.cfg.to_dict(), "shapes": list(SHAPES), "colours": list(COLOURS)}
    info.update(meta or {})
    (directory / "evaluator.json").write_text(json.dumps(info, indent=2))
    return directory


def load_evaluator(directory: str | os.PathLike = DEFAULT_DIR) -> PixelEvaluator:
    directory = Path(directory)
    cfg_path, w_path = directory / "evaluator.json", directory / "evaluator.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: missing; train one with `python -m shapes_world.evaluator --out {directory}`"
            )
    info = json.loads(cfg_path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format is {info.get('format')!r}, expected {FORMAT!r}")
    if info.get("shapes") != list(SHAPES) or info.get("colours") != list(COLOURS):
        raise ValueError(
            f"{cfg_path}: classes {info.get('shapes')} / {info.get('colours')} differ from this code's "
            f"{list(SHAPES)} / {list(COLOURS)}; retrain the evaluator"
        )
    model = PixelEvaluator(EvaluatorConfig(**info["config"]))
    sd = load_file(str(w_path))
    expected = model.state_dict()
    if set(sd) != set(expected):
        raise ValueError(f"{w_path}: keys {sorted(set(sd) ^ set(expected))[:5]} do not match the evaluator")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{w_path}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(sd)
    return model.eval()


def train_evaluator(steps: int, batch: int = 64, lr: float = 3e-3, seed: int = 1,
                    cfg: EvaluatorConfig | None = None, log_every: int = 100) -> PixelEvaluator:
    torch.manual_seed(seed)
    model = PixelEvaluator(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.monotonic()
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 7_919 + step)
        s = generate_scenes(batch, seed=int(torch.randint(2**62, (1,), generator=gen)))
        out = model(augment(s.images, gen))
        loss = F.cross_entropy(out.shape_logits, s.shape_map) + F.cross_entropy(out.colour_logits, s.colour_map)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0:
            logger.info("evaluator step %d loss %.4f (%.2f s/step)", step + 1, loss.item(),
                        (time.monotonic() - t0) / (step + 1))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_DIR)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    model = train_evaluator(a.steps, a.batch, a.lr, a.seed)
    clean, noisy = evaluate(model), evaluate(model, noise=True)
    logger.info("held-out accuracy (clean): %s", clean._asdict())
    logger.info("held-out accuracy (noisy): %s", noisy._asdict())
    meta = {"steps": a.steps, "batch": a.batch, "lr": a.lr, "seed": a.seed,
            "heldout_seed": 10_000_019, "heldout_clean": clean._asdict(), "heldout_noisy": noisy._asdict()}
    save_evaluator(model, a.out, meta)
    logger.info("saved %s", a.out)


if __name__ == "__main__":
    main()
