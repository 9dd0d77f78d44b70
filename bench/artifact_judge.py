"""Validation of the artifact judge (shapes_world/artifacts.py) against ground truth, the model and the evaluator.

    python bench/artifact_judge.py                                   # about 20 min on 2 CPU cores
    python bench/artifact_judge.py --renders 16 --concepts red --targets 4 --others 2 --grid judged.png  # a quick look

1. Clean generator scenes (exact ground truth, no defect): share flagged, per background and texture; should be 0.
2. The model's own unedited renders: share flagged per background and texture (what the model gets wrong itself).
3. Edited images (PER random and SAeUron steering from the same seeds, as in bench/erasure.py): the judge's rate
   beside the evaluator-based ``artifact_rate``, and what the pixel evaluator says about the pixels the judge
   flags: the share it names background with confidence (which ``unrecognised`` cannot count).
``--grid`` writes the edited images with the flagged pixels beside them (magenta) to look at.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_core.files import recorded_path  # noqa: E402
from sae_core.intervention import ReplaceSettings  # noqa: E402
from sae_core.steer import SteerSettings  # noqa: E402
from shapes_world import artifacts  # noqa: E402
from shapes_world.erasure import CONFIDENT, WEIGHTS, evaluate_concept, load_world, prompt_sets  # noqa: E402
from shapes_world.render import render  # noqa: E402
from shapes_world.scenes import generate_scenes, parse_caption  # noqa: E402


def by_background(flags: torch.Tensor, captions: list[str]) -> dict[str, dict[str, float]]:
    """Share flagged and count per '<background> <texture>' of the captions."""
    out: dict[str, list[bool]] = {}
    for f, c in zip(flags.tolist(), captions, strict=True):
        p = parse_caption(c)
        out.setdefault(f"{p.background} {p.texture}", []).append(bool(f))
    return {k: {"rate": sum(v) / len(v), "n": len(v)} for k, v in sorted(out.items())}


@torch.no_grad()
def evaluator_view(evaluator, images: torch.Tensor, j: artifacts.Judgement) -> dict[str, float]:
    """Of the pixels in the judge's odd blobs: the share the evaluator names background (both heads), and the share
    it is unsure about (the pixels ``shapes_world.erasure.unrecognised`` counts)."""
    out = evaluator(images)
    ps, pc = out.shape_logits.softmax(1), out.colour_logits.softmax(1)
    unsure = (ps.amax(1) < CONFIDENT) | (pc.amax(1) < CONFIDENT) | ((ps.argmax(1) == 0) != (pc.argmax(1) == 0))
    background = (ps.argmax(1) == 0) & (pc.argmax(1) == 0) & ~unsure
    blobs = j.blobs  # smudge / ghost / broken stripe pixels, not the objects flagged for their colour or count
    n = int(blobs.sum())
    return {"pixels": n, "named_background": float((background & blobs).sum()) / max(n, 1),
            "unrecognised": float((unsure & blobs).sum()) / max(n, 1)}


def write_grid(path: Path, images: torch.Tensor, flagged: torch.Tensor, labels: list[str], cols: int = 8,
               scale: int = 5) -> None:
    from PIL import Image, ImageDraw

    n, s, pad, head = images.shape[0], images.shape[-1] * scale, 3, 24
    rows = (n + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (2 * s + pad) + pad, rows * (s + head + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    tint = images.clone()
    tint[:, 0] = torch.where(flagged, 1.0, tint[:, 0])
    tint[:, 1] = torch.where(flagged, 0.0, tint[:, 1])
    tint[:, 2] = torch.where(flagged, 1.0, tint[:, 2])
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = pad + c * (2 * s + pad), pad + r * (s + head + pad)
        for k, img in enumerate((images[i], tint[i])):
            arr = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            canvas.paste(Image.fromarray(arr, "RGB").resize((s, s), Image.NEAREST), (x + k * s, y + head))
        draw.text((x, y), labels[i][:40], fill="black")
        draw.text((x, y + 11), labels[i][40:80], fill="black")
    canvas.save(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--clean", type=int, default=2048, help="generator scenes for part 1")
    p.add_argument("--renders", type=int, default=96, help="unedited model renders for part 2")
    p.add_argument("--concepts", nargs="*", default=["red", "cyan", "blue", "yellow"], help="targets for part 3")
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--others", type=int, default=4)
    p.add_argument("--gamma", type=float, default=-16.0, help="SAeUron scale to compare PER with")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", type=Path, default=None, help="PNG of the edited images with the judge's flags")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    out: dict = {"settings": {k: (recorded_path(v, Path(__file__).resolve().parents[1]) if isinstance(v, Path) else v) for k, v in vars(a).items()}}

    s = generate_scenes(a.clean, seed=70_000_003)
    t = time.time()
    j = artifacts.judge(s.images, s.captions)
    out["clean"] = {"rates": artifacts.rates(j), "by_background": by_background(j.artifact, s.captions),
                    "ms_per_image": 1000 * (time.time() - t) / a.clean}
    print(f"1. clean generator scenes ({a.clean}): flagged {out['clean']['rates']['artifact']:.4f}; "
          f"{out['clean']['ms_per_image']:.1f} ms per image")

    world = load_world(a.weights, a.concepts or None) if a.renders or a.concepts else None
    if a.renders:
        caps = generate_scenes(a.renders, seed=60_000_011).captions
        imgs = render(world.model, caps, seed=0, steps=a.steps)
        j = artifacts.judge(imgs, caps)
        out["renders"] = {"rates": artifacts.rates(j), "by_background": by_background(j.artifact, caps)}
        print(f"2. unedited renders ({a.renders}): flagged {out['renders']['rates']['artifact']:.3f}")
        for k, v in out["renders"]["by_background"].items():
            print(f"   {k:15s} {v['rate']:.3f} of {v['n']}")
        print("   reasons: " + ", ".join(f"{k} {v:.3f}" for k, v in out["renders"]["rates"].items() if k != "artifact"))

    methods = {"PER random": ReplaceSettings("random", seed=0), f"SAeUron scale {a.gamma:g}": SteerSettings("saeuron_scale", a.gamma)}
    edits: dict = {}
    grid_imgs, grid_flags, grid_labels = [], [], []
    for c in a.concepts:
        tc, oc = prompt_sets(c, a.targets, a.others)
        res, images = evaluate_concept(world, c, tc, oc, methods, steps=a.steps)
        for m in ["original", *methods]:
            j = artifacts.judge(images[m], tc + oc)
            edits.setdefault(m, {})[c] = {"artifact_rate": res.methods[m]["artifact_rate"],
                                          "artifact_rate_judge": float(j.artifact.float().mean()),
                                          "judge_reasons": artifacts.rates(j),
                                          "evaluator_on_flagged": evaluator_view(world.evaluator, images[m], j)}
            if m != "original":
                grid_imgs.append(images[m])
                grid_flags.append(j.flagged)
                grid_labels += [f"{c} {m}: " + (",".join(k for k, v in j.reasons.items() if v[i] > 0) or "-")
                                for i in range(len(tc) + len(oc))]
        print(f"[{time.time() - t0:5.0f} s] {c} done", flush=True)
    if edits:
        print(f"3. edited images, concepts {a.concepts}, {a.targets}+{a.others} prompts each")
        print(f"{'method':22s} {'artifact (evaluator)':>20s} {'judge':>8s} {'flagged px':>10s} {'named bg':>9s} {'unrecog.':>9s}")
        out["edits"] = {}
        for m, per in edits.items():
            ev = [v["evaluator_on_flagged"] for v in per.values()]
            npx = sum(e["pixels"] for e in ev)
            row = {"artifact_rate": sum(v["artifact_rate"] for v in per.values()) / len(per),
                   "artifact_rate_judge": sum(v["artifact_rate_judge"] for v in per.values()) / len(per),
                   "flagged_pixels": npx,
                   "named_background": sum(e["named_background"] * e["pixels"] for e in ev) / max(npx, 1),
                   "unrecognised": sum(e["unrecognised"] * e["pixels"] for e in ev) / max(npx, 1),
                   "per_concept": per}
            out["edits"][m] = row
            print(f"{m:22s} {row['artifact_rate']:20.3f} {row['artifact_rate_judge']:8.3f} {npx:10d} "
                  f"{row['named_background']:9.3f} {row['unrecognised']:9.3f}")
        if a.grid:
            write_grid(a.grid, torch.cat(grid_imgs), torch.cat(grid_flags), grid_labels)
            print(f"grid: {a.grid}")
    print(f"[{time.time() - t0:.0f} s]")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
