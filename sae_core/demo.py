"""The main job on an embedded default: learn, detect and erase a planted concept, then compare PER with steering."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple, TextIO

import torch
from einops import rearrange
from PIL import Image, ImageDraw

from .concept_stats import ConceptStatsAccumulator
from .detect import ConceptDetector, DetectionSettings
from .files import atomic_write
from .intervention import BlockIntervention, Recorder, ReplaceSettings, StepInfo
from .selection import SelectionRule, build_concept_dictionary
from .stats import activation_shift
from .steer import SteerSettings
from .synthetic import coverage_regions, planted_maps, planted_sae

logger = logging.getLogger(__name__)


class DemoRow(NamedTuple):
    method: str
    detection_iou: float
    concept_left: float
    """Mean planted-direction component left in the planted region, as a share of the original."""
    max_change_outside: float
    """Largest change of any patch outside the detected region (0 = bit-identical)."""
    norm_w1: float
    """Wasserstein-1 distance of token norms from the unedited maps (lower = more in distribution)."""
    frechet: float
    """Diagonal Frechet distance of channel moments from the unedited maps."""


def _tiles(values: torch.Tensor, scale: int) -> Image.Image:
    """[H, W] in [0, 1] -> an RGB tile (dark blue to yellow), upscaled without smoothing."""
    v = values.clamp(0, 1)
    rgb = torch.stack([v, 0.2 + 0.6 * v, 0.5 * (1 - v)], dim=-1)
    img = Image.fromarray((rgb * 255).round().to(torch.uint8).numpy(), "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def run_demo(out_dir: str | Path = "demo_output", *, images: int = 4, grid: tuple[int, int] = (12, 16),
             width: int = 64, latents: int = 256, gamma: float = -10.0, coverage: float = 0.2,
             out: TextIO | None = None) -> list[DemoRow]:
    """Build the planted world, learn the concept, run PER and steering through BlockIntervention.

    Writes ``out_dir/planted_comparison.png`` and returns one row per method.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    H, W = grid
    sae, u = planted_sae(d=width, M=latents)

    # Learn the concept the SAeUron way: mean codes of concept vs concept-free maps at a few timesteps.
    acc = ConceptStatsAccumulator(sae.cfg.n_latents)
    for t in (999.0, 500.0, 1.0):
        with_c = planted_maps(images, H, W, u, seed=11, region=coverage_regions(images, H, W, coverage, seed=11))
        without = planted_maps(images, H, W, u, seed=12, region=torch.zeros(images, H, W, dtype=torch.bool))
        acc.add("planted", t, sae.encode(rearrange(with_c.block_out, "b c h w -> b h w c")))
        acc.add("background", t, sae.encode(rearrange(without.block_out, "b c h w -> b h w c")))
    concept = build_concept_dictionary(acc.stats(), SelectionRule("top_n", top_n=1), keep=["planted"],
                                       sae_fingerprint=sae.fingerprint())
    detector = ConceptDetector(concept, DetectionSettings(), sae=sae)

    test = planted_maps(images, H, W, u, seed=3, region=coverage_regions(images, H, W, coverage, seed=3))
    x = torch.cat([test.block_out, test.block_out])  # a CFG batch: [cond, uncond] rows
    step = StepInfo(500.0, chunks=(0, 1), step_index=0)
    methods = {
        "PER (random, paper default)": ReplaceSettings("random", seed=0),
        "PER (nearest)": ReplaceSettings("nearest"),
        f"SAeUron steer gamma={gamma:g}": SteerSettings("saeuron_scale", gamma),
        f"SAeUron steer gamma={gamma:g} legacy": SteerSettings("saeuron_scale", gamma, error="legacy_saeuron"),
        "sdxl-unbox add -3": SteerSettings("unbox_add", -3.0, detected_only=True),
    }
    rows, edited = [], {}
    region = test.region
    along = lambda t: torch.einsum("bchw,c->bhw", t, u)  # noqa: E731
    before = along(test.block_out)
    for name, edit in methods.items():
        recorder = Recorder()
        y = BlockIntervention(sae, detector, edit, recorder=recorder)(None, x, step)[:images]
        mask = torch.stack([recorder.masks(branch="cond", image=i)[1][0] for i in range(images)]).bool()
        inter = (mask & region).sum().item()
        union = (mask | region).sum().item()
        left = (along(y)[region].abs().mean() / before[region].abs().mean()).item()
        outside = (y - test.block_out).abs().amax(dim=1)[~mask]
        shift = activation_shift(y, test.block_out)
        rows.append(DemoRow(name, inter / max(union, 1), left, float(outside.max()) if outside.numel() else 0.0,
                            shift.norm_w1, shift.channel_frechet))
        edited[name] = (y, mask)

    _write_grid(out_dir / "planted_comparison.png", before, region, edited, along)
    _print_table(rows, out, out_dir)
    return rows


def _write_grid(path: Path, before, region, edited, along) -> None:
    scale, pad, label_h = 12, 6, 28
    cols = [("planted region", region.float()), ("|concept| before", before / 3)]
    first_mask = next(iter(edited.values()))[1]
    cols.append(("detected", first_mask.float()))
    cols += [(name, along(y) / 3) for name, (y, _) in edited.items()]
    n_img, (H, W) = region.shape[0], region.shape[1:]
    tw, th = W * scale, H * scale
    canvas = Image.new("RGB", (len(cols) * (tw + pad) + pad, n_img * (th + pad) + pad + label_h * 2), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (name, maps) in enumerate(cols):
        x0 = pad + c * (tw + pad)
        for line, text in enumerate((name[:24], name[24:48])):
            draw.text((x0, 4 + 12 * line), text, fill="black")
        for i in range(n_img):
            canvas.paste(_tiles(maps[i].abs().float(), scale), (x0, label_h * 2 + pad + i * (th + pad)))
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"), what="comparison image")


def _print_table(rows: list[DemoRow], out: TextIO | None, out_dir: Path) -> None:
    lines = [
        f"{'method':36s} {'det. IoU':>8s} {'|concept| left':>14s} {'max change outside':>19s} "
        f"{'norm W1':>8s} {'Frechet':>8s}",
    ]
    for r in rows:
        lines.append(f"{r.method:36s} {r.detection_iou:8.3f} {r.concept_left:14.3f} {r.max_change_outside:19.4g} "
                     f"{r.norm_w1:8.4f} {r.frechet:8.4f}")
    lines.append(f"images: {out_dir / 'planted_comparison.png'}")
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.write(text)
    else:
        logger.info("\n%s", text)
