"""Erasure quality on the shapes world: PER modes against a sweep of steering strengths.

    python bench/erasure.py --json erasure.json            # the README table (colours and shapes, 2 processes)
    python bench/erasure.py --concepts red --targets 4 --others 2 --steps 8   # a quick look

Per target concept: fixed prompt sets from the scene generator (seeded), the original images, detection alone,
every PER mode and every steering strength from the same seeds; metrics as defined in shapes_world/erasure.py.
The artifact threshold is calibrated once per run on the unedited images of a separate prompt set.
Averages over concepts are printed per method; for steering, the strength with the best balance
(the largest erasure_rate + preservation, ties to the smaller |strength|) and the one whose erasure rate is
closest to the recommended PER configuration's (for the artifact comparison) are reported along with the full
sweep. Same weights and arguments -> the same numbers (every draw is seeded; one CPU thread per process, concepts
spread over --jobs processes).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae_core.detect import DetectionSettings  # noqa: E402
from sae_core.files import recorded_path  # noqa: E402
from sae_core.intervention import StepWindow  # noqa: E402
from shapes_world.erasure import (  # noqa: E402
    DETECTION,
    PER_DEFAULT_NAME,
    PROMPT_SEED,
    PSNR_CAP,
    WEIGHTS,
    artifact_threshold,
    evaluate_concept,
    load_world,
    methods_for,
    prompt_sets,
    unrecognised,
)
from shapes_world.render import render  # noqa: E402
from shapes_world.scenes import COLOURS, generate_scenes  # noqa: E402

# shape concepts that localise with the shipped shape SAE (detection IoU >= 0.6: README "Shapes world")
LOCALISED_SHAPES = ("circle", "square", "triangle")

KEYS = ("erasure_rate", "preservation", "unchanged_psnr_db", "unchanged_identical", "artifact_rate", "ood_distance",
        "artifact_rate_judge")


def average(per_concept: dict, method: str) -> dict:
    out = {}
    for k in KEYS:
        vals = [r["methods"][method][k] for r in per_concept.values() if not math.isnan(r["methods"][method][k])]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    # PSNR over all concepts' other prompts from the pooled error (each concept has as many other prompts)
    mse = [r["methods"][method]["unchanged_mse"] for r in per_concept.values()]
    mse = [m for m in mse if not math.isnan(m)]
    if mse:
        m = sum(mse) / len(mse)
        out["unchanged_psnr_db"] = PSNR_CAP if m == 0 else min(PSNR_CAP, 10 * math.log10(1.0 / m))
    out["detection_iou"] = sum(r["detection_iou"] for r in per_concept.values()) / len(per_concept)
    reasons = [r["methods"][method]["judge_reasons"] for r in per_concept.values()]
    out["judge_reasons"] = {k: sum(x[k] for x in reasons) / len(reasons) for k in reasons[0]}
    return out


def one_concept(c, weights, targets, others, seed, steps, cfg, scale, add, artifact_pixels, detection, window, threads,
                prompt_seed=PROMPT_SEED, block_only=False, world=None) -> dict:
    """Every method's metrics for concept ``c`` (also in a worker process of --jobs, which loads its own world)."""
    torch.set_num_threads(threads)
    world = world or load_world(weights, [c])
    tc, oc = prompt_sets(c, targets, others, seed=prompt_seed)
    res, _ = evaluate_concept(world, c, tc, oc, methods_for(scale, add, block_only), seed=seed, steps=steps, cfg=cfg,
                              artifact_pixels=artifact_pixels, detection=detection, window=window)
    return {"detection_iou": res.detection_iou, "methods": res.methods}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--concepts", nargs="+", default=list(COLOURS) + list(LOCALISED_SHAPES),
                   help="target concepts (default: the six colours and the shapes whose detection IoU reaches 0.6)")
    p.add_argument("--targets", type=int, default=16, help="prompts naming the target, per concept")
    p.add_argument("--others", type=int, default=8, help="prompts without the target, per concept")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first prompt (prompt i: seed + i)")
    p.add_argument("--prompt-seed", type=int, default=PROMPT_SEED,
                   help="seed of the scene generator drawing the prompt sets; another value = held-out prompts")
    p.add_argument("--scale", type=float, nargs="*", default=[-1.0, -4.0, -16.0, -64.0],
                   help="SAeUron gamma sweep (saeuron_scale)")
    p.add_argument("--add", type=float, nargs="*", default=[-32.0, -128.0, -512.0],
                   help="sdxl-unbox strength sweep (unbox_add on the detected patches)")
    p.add_argument("--padding", type=int, default=DETECTION.padding, help="patches added around the mask for the edits")
    p.add_argument("--min-region", type=int, default=DETECTION.min_region,
                   help="drop detected regions smaller than this many patches of a 16x16 grid before the edits "
                        "(the same share of the picture on other grids: 1 patch at the shape SAE's 8x8)")
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("T_MIN", "T_MAX"),
                   help="edit only at model timesteps in [T_MIN, T_MAX] (999 = first DDIM step); default every step")
    p.add_argument("--calibration", type=int, default=64, help="unedited images that set the artifact threshold")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="concepts evaluated in parallel processes (each with --threads threads); same numbers")
    p.add_argument("--block-only", action="store_true",
                   help="also the recommended PER without the denoised fill (two more samplings per concept)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    world = load_world(a.weights, a.concepts)
    calib = generate_scenes(a.calibration, seed=60_000_011).captions
    calib_imgs = render(world.model, calib, seed=a.seed, steps=a.steps, cfg=a.cfg)
    artifact_pixels = artifact_threshold(unrecognised(world.evaluator, calib_imgs))
    methods = methods_for(a.scale, a.add, a.block_only)
    detection = DetectionSettings(DETECTION.threshold_scale, a.padding, a.min_region)
    window = None if a.window is None else StepWindow(timestep_min=a.window[0], timestep_max=a.window[1])
    job = (a.weights, a.targets, a.others, a.seed, a.steps, a.cfg, a.scale, a.add, artifact_pixels, detection, window,
           a.threads, a.prompt_seed, a.block_only)
    per_concept = {}
    if a.jobs > 1 and len(a.concepts) > 1:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state shared with the parent
        with concurrent.futures.ProcessPoolExecutor(min(a.jobs, len(a.concepts)), mp_context=ctx) as pool:
            futures = {pool.submit(one_concept, c, *job): c for c in a.concepts}
            for f in concurrent.futures.as_completed(futures):
                c = futures[f]
                per_concept[c] = f.result()
                print(f"[{time.time() - t0:5.0f} s] {c}: detection IoU {per_concept[c]['detection_iou']:.3f}", flush=True)
        per_concept = {c: per_concept[c] for c in a.concepts}
    else:
        for c in a.concepts:
            per_concept[c] = one_concept(c, *job, world=world)
            print(f"[{time.time() - t0:5.0f} s] {c}: detection IoU {per_concept[c]['detection_iou']:.3f}", flush=True)

    rows = {m: average(per_concept, m) for m in methods}
    per_names = [m for m in methods if m.startswith("PER")]
    steer_names = [m for m in methods if not m.startswith("PER")]
    best = matched = None
    if steer_names:  # --scale and --add may both be given empty to measure PER alone
        best = max(steer_names, key=lambda m: (rows[m]["erasure_rate"] + rows[m]["preservation"], -abs(methods[m].strength)))
        ref = rows[PER_DEFAULT_NAME]["erasure_rate"]
        matched = min(steer_names, key=lambda m: (abs(rows[m]["erasure_rate"] - ref), abs(methods[m].strength)))
    baseline_artifacts = sum(r["methods"]["original"]["artifact_rate"] for r in per_concept.values()) / len(per_concept)
    baseline_judge = sum(r["methods"]["original"]["artifact_rate_judge"] for r in per_concept.values()) / len(per_concept)

    print(f"\nshapes world erasure, concepts {a.concepts}, {a.targets}+{a.others} prompts each, {a.steps} DDIM steps, "
          f"CFG {a.cfg:g}; edits on the mask with padding {a.padding}, min_region {a.min_region} (of a 16x16 grid), window {a.window or 'all steps'}; artifact threshold {artifact_pixels} unrecognised pixels (unedited images over it: "
          f"{baseline_artifacts:.3f}); judge = shapes_world.artifacts (unedited images flagged: {baseline_judge:.3f})")
    w = max(36, *(len(m) for m in methods))
    print(f"{'method':{w}s} {'erasure':>8s} {'preserv.':>8s} {'PSNR dB':>8s} {'ident.':>8s} {'det IoU':>8s} {'artifact':>8s} "
          f"{'OOD W1':>8s} {'judge':>8s}")
    for m in methods:
        r = rows[m]
        tag = " *best" if m == best else (" *matched" if m == matched else "")
        print(f"{m:{w}s} {r['erasure_rate']:8.3f} {r['preservation']:8.3f} {r['unchanged_psnr_db']:8.2f} "
              f"{r['unchanged_identical']:8.3f} "
              f"{r['detection_iou']:8.3f} {r['artifact_rate']:8.3f} {r['ood_distance']:8.4f} {r['artifact_rate_judge']:8.3f}{tag}")
    print("per concept detection IoU: " + ", ".join(f"{c} {per_concept[c]['detection_iou']:.3f}" for c in a.concepts))
    shown = [PER_DEFAULT_NAME] + ([matched] if matched else [])
    print(f"\nper concept: erasure / preservation / identical / artifact / judge of {' | '.join(shown)}")
    for c in a.concepts:
        cells = []
        for m in shown:
            r = per_concept[c]["methods"][m]
            cells.append(f"{r['erasure_rate']:.2f} {r['preservation']:.2f} {r['unchanged_identical']:.2f} "
                         f"{r['artifact_rate']:.2f} {r['artifact_rate_judge']:.2f}")
        print(f"  {c:9s} " + " | ".join(cells))
    print(f"[{time.time() - t0:.0f} s]")

    out = {
        "per": {**rows[PER_DEFAULT_NAME], "config": PER_DEFAULT_NAME, "modes": {m: rows[m] for m in per_names}},
        "steer": {} if best is None else {**rows[best], "best": best, "strength": methods[best].strength,
                                          "matched_to_per_erasure": matched, "sweep": {m: rows[m] for m in steer_names}},
        "artifact_pixels": artifact_pixels, "unedited_artifact_rate": baseline_artifacts,
        "unedited_artifact_rate_judge": baseline_judge,
        "per_concept": per_concept,
        "settings": {k: (recorded_path(v, ROOT) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "json"},
    }
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
