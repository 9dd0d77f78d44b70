"""A/B of one BlockIntervention call: an older sae_core (before) vs this checkout (after), same process, interleaved.

The hooked block of SD1 / SDXL at 512x512 px: a [rows, 1280, 16, 16] map, ReLU-TopK SAE k = 32,
M = 5120 and 20480, one concept latent firing on ~25 % of the patches, rows 1 (cond) and 2 (CFG pair).
Outputs of both versions are checked equal; times are medians over interleaved repeats.

    mkdir BEFORE && git archive REV sae_core | tar -x -C BEFORE     # the version to compare against
    python bench/hook_ab.py --before BEFORE [--reps 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(path: pathlib.Path, name: str):
    """Import the sae_core package under ``path`` as ``name`` (its imports are relative)."""
    tmp = pathlib.Path(tempfile.mkdtemp())
    shutil.copytree(path / "sae_core", tmp / name)
    sys.path.insert(0, str(tmp))
    pkg = importlib.import_module(name)
    for sub in ("config", "sae", "concepts", "detect", "steer", "intervention"):
        importlib.import_module(f"{name}.{sub}")
    return pkg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="a directory holding the older sae_core/")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    versions = {"before": load(pathlib.Path(args.before), "sae_core_before"), "after": load(ROOT, "sae_core_after")}
    d, H, W = 1280, 16, 16
    print(f"one BlockIntervention call on a [rows, {d}, {H}, {W}] map, {args.threads} thread(s), median of {args.reps}")
    print("floor = encode_topk alone (the pre-activation GEMM and the TopK every method needs)")
    print(f"{'M':>6s} {'rows':>4s} {'method':7s} {'before ms':>10s} {'after ms':>9s} {'after/before':>12s} "
          f"{'floor ms':>9s} {'after/floor':>11s}")
    for M in (5120, 20480):
        g = torch.Generator().manual_seed(M)
        W_dec = torch.randn(M, d, generator=g)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        W_enc = W_dec + 0.1 * torch.randn(M, d, generator=g) / d ** 0.5
        b_enc = -0.01 * torch.rand(M, generator=g)
        x = torch.randn(2, d, H, W, generator=g)
        saes = {n: P.sae.SparseAutoencoder(P.config.SAEConfig(d_in=d, n_latents=M, k=32, activation="relu_topk"),
                                           W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=torch.zeros(d))
                for n, P in versions.items()}
        codes = saes["after"].encode(x.permute(0, 2, 3, 1).reshape(-1, d))
        lat = int((codes > 0).sum(0).argmax())
        thr = float(torch.quantile(codes[:, lat], 0.75))
        for rows in (1, 2):
            xb = x[:rows].contiguous()
            for meth in ("detect", "per", "steer"):
                ivs, steps = {}, {}
                for n, P in versions.items():
                    det = P.detect.ConceptDetector(P.concepts.ConceptDictionary.from_latents([lat], M, threshold=thr,
                                                                                             means=[0.5]))
                    edit = {"detect": None, "per": P.intervention.ReplaceSettings("random"),
                            "steer": P.steer.SteerSettings("saeuron_scale", -5.0)}[meth]
                    ivs[n] = P.intervention.BlockIntervention(saes[n], det, edit, recorder=P.intervention.Recorder())
                    steps[n] = P.intervention.StepInfo(500.0, chunks=(0,) if rows == 1 else (1, 0), step_index=0)
                ts: dict[str, list[float]] = {"before": [], "after": [], "floor": []}
                tokens = xb.permute(0, 2, 3, 1)
                outs = {}
                with torch.inference_mode():
                    for r in range(args.reps + 1):
                        for n in (("before", "after") if r % 2 else ("after", "before")):
                            t0 = time.perf_counter()
                            outs[n] = ivs[n](None, xb, steps[n])
                            dt = time.perf_counter() - t0
                            ivs[n].recorder.reset()
                            if r:
                                ts[n].append(dt)
                        t0 = time.perf_counter()
                        saes["after"].encode_topk(tokens)
                        if r:
                            ts["floor"].append(time.perf_counter() - t0)
                if not torch.equal(outs["before"], outs["after"]):
                    raise SystemExit(f"M={M} rows={rows} {meth}: before and after outputs differ")
                b, a = statistics.median(ts["before"]), statistics.median(ts["after"])
                f = statistics.median(ts["floor"])
                print(f"{M:6d} {rows:4d} {meth:7s} {1000 * b:10.1f} {1000 * a:9.1f} {a / b:12.3f} {1000 * f:9.1f} "
                      f"{a / f:11.3f}")


if __name__ == "__main__":
    main()
