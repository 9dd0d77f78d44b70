"""What does one BlockIntervention call cost beyond the SAE encode it cannot avoid?

Times, on the same map in the same run: the bare encode (the floor), detection only, PER (random,
nearest) and SAeUron steering (preserve, which decodes twice). Default size is SAeUron's block:
16x16 map, 1280 channels, M = 20480, k = 32, a CFG batch of 2.

    python bench/intervention_overhead.py [--device cuda] [--dtype float16] [--reps 5]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
from einops import rearrange

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sae_core.concepts import ConceptDictionary  # noqa: E402
from sae_core.detect import ConceptDetector  # noqa: E402
from sae_core.intervention import BlockIntervention, Recorder, ReplaceSettings, StepInfo  # noqa: E402
from sae_core.steer import SteerSettings  # noqa: E402
from sae_core.synthetic import coverage_regions, planted_maps, planted_sae  # noqa: E402


def timed(fn, reps: int, device: str) -> float:
    fn()  # warm-up (weight casts, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="16x16")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--latents", type=int, default=20480)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2, help="rows: CFG [uncond, cond] x images")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    H, W = (int(v) for v in args.grid.lower().split("x"))
    dtype = getattr(torch, args.dtype)
    sae, u = planted_sae(d=args.width, M=args.latents, activation="relu_topk", k=args.k)
    sae = sae.to(args.device)
    B = args.batch
    pm = planted_maps(B, H, W, u, region=coverage_regions(B, H, W, 0.25))
    x = pm.block_out.to(args.device, dtype)
    det = ConceptDetector(ConceptDictionary.from_latents([0], args.latents, threshold=1.0, means=[0.5]))
    chunks = (1, 0) if B % 2 == 0 else (0,)
    step = StepInfo(500.0, chunks=chunks, step_index=0)
    cases = {
        "encode only (floor)": lambda: sae.encode(rearrange(x, "b c h w -> b h w c")),
        "detect + record": lambda: BlockIntervention(sae, det, None, recorder=Recorder())(None, x, step),
        "PER random": lambda: BlockIntervention(sae, det, ReplaceSettings("random"))(None, x, step),
        "PER nearest": lambda: BlockIntervention(sae, det, ReplaceSettings("nearest"))(None, x, step),
        "steer saeuron preserve": lambda: BlockIntervention(sae, det, SteerSettings("saeuron_scale", -10.0))(None, x, step),
    }
    print(f"map {B}x{args.width}x{H}x{W}, M={args.latents}, k={args.k}, {args.device} {args.dtype}, {args.threads} thread(s)")
    print(f"{'case':26s} {'ms/call':>10s} {'x encode':>9s}")
    base = None
    with torch.no_grad():
        for name, fn in cases.items():
            t = timed(fn, args.reps, args.device)
            base = base or t
            print(f"{name:26s} {1000 * t:10.2f} {t / base:9.2f}")


if __name__ == "__main__":
    main()
