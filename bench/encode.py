"""Benchmark: SAE encode + decode on one 16x16x1280 block map against the two dense GEMMs it must do.

    python bench/encode.py [--device cpu] [--dtype float32] [--repeats 20] [--json out.json]

For M = 5120 (sdxl-unbox: TopK-then-ReLU, k = 10) and M = 20480 (SAeUron: ReLU-then-TopK, k = 32) it
times, in the same run and on the same weights and input:

  matmul     codes = x @ W_enc.T ; y = codes @ W_dec      (the floor: two dense GEMMs, nothing else)
  sae        sae(x): encode to dense codes + dense decode (what an intervention calls)
  sae topk   encode_topk + decode_topk                    (the kept-latents path, for reference)

and prints medians after warm-up with the ratio sae / matmul (target <= 1.5). --breakdown adds the
parts of sae(x) one by one, to show where any excess goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sae_core import SAEConfig, SparseAutoencoder  # noqa: E402

TOKENS_HW = (16, 16)
D = 1280
CASES = (  # (M, activation, k): the two published SAE sizes
    (5120, "topk_relu", 10),
    (20480, "relu_topk", 32),
)


def make_sae(M: int, activation: str, k: int, seed: int = 0) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(M, D, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    return SparseAutoencoder(
        SAEConfig(d_in=D, n_latents=M, k=k, activation=activation),
        W_enc=torch.randn(M, D, generator=g) / D**0.5,
        b_enc=torch.randn(M, generator=g) * 0.1,
        W_dec=W_dec,
        b_dec=torch.randn(D, generator=g) * 0.1,
        source=f"bench M={M}",
    )


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn, *, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() after warm-up."""
    return statistics.median(timed_together({"fn": fn}, device=device, warmup=warmup, repeats=repeats)["fn"])


def timed_together(fns: dict, *, device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, the fns taking turns call by call.

    Taking turns makes load from other processes on a shared machine hit every fn alike, so the
    ratios stay meaningful even when the absolute times drift.
    """
    sync = _sync(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def run_case(M, activation, k, *, device, dtype, warmup, repeats, breakdown):
    sae = make_sae(M, activation, k).to(device)
    x = torch.randn(1, *TOKENS_HW, D, device=device, dtype=dtype)  # one map, channels last
    w = sae.weights(device, dtype)  # the cast weights the SAE itself uses, cached
    W_enc_t = w.W_enc.t()
    W_dec = w.W_dec

    def matmul():
        return (x @ W_enc_t) @ W_dec

    def sae_dense():
        return sae(x)

    def sae_topk():
        kept = sae.encode_topk(x)
        return sae.decode_topk(kept.values, kept.indices, kept.norm)

    row = {"M": M, "activation": activation, "k": k}
    with torch.inference_mode():
        t = timed_together(
            {"matmul": matmul, "sae": sae_dense, "sae_topk": sae_topk},
            device=device,
            warmup=warmup,
            repeats=repeats,
        )
        for name, values in t.items():
            row[f"{name}_ms"] = 1e3 * statistics.median(values)
        if breakdown:
            pre = sae.pre_acts(x)
            codes = sae.activate(pre)
            values, indices = sae._select(pre)
            parts = {
                "pre_acts (GEMM + biases)": lambda: sae.pre_acts(x),
                "bare GEMM x @ W_enc.T": lambda: x @ W_enc_t,
                "select (relu/topk)": lambda: sae._select(pre),
                "scatter into dense": lambda: torch.zeros_like(pre).scatter_(-1, indices, values),
                "decode (addmm)": lambda: sae.decode(codes),
                "bare GEMM codes @ W_dec": lambda: codes @ W_dec,
            }
            row["breakdown_ms"] = {
                name: 1e3 * timed(fn, device=device, warmup=warmup, repeats=repeats)
                for name, fn in parts.items()
            }
    row["ratio"] = row["sae_ms"] / row["matmul_ms"]
    row["ratio_topk"] = row["sae_topk_ms"] / row["matmul_ms"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", default=None, help="float32 (default on CPU), float16 or bfloat16 (default on GPU)"
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--breakdown", action="store_true", help="also time the parts of sae(x)")
    p.add_argument("--json", type=Path, help="write the ratios here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "float16"))
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"device={device} dtype={str(dtype).replace('torch.', '')} threads={torch.get_num_threads()} "
        f"map={TOKENS_HW[0]}x{TOKENS_HW[1]}x{D} ({TOKENS_HW[0] * TOKENS_HW[1]} tokens) torch={torch.__version__}"
    )
    rows = [
        run_case(
            M,
            act,
            k,
            device=device,
            dtype=dtype,
            warmup=args.warmup,
            repeats=args.repeats,
            breakdown=args.breakdown,
        )
        for M, act, k in CASES
    ]
    print(
        f"{'M':>6} {'activation':<10} {'k':>3} {'matmul ms':>10} {'sae ms':>9} {'ratio':>6} {'topk ms':>9} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['M']:>6} {r['activation']:<10} {r['k']:>3} {r['matmul_ms']:>10.3f} {r['sae_ms']:>9.3f} "
            f"{r['ratio']:>6.2f} {r['sae_topk_ms']:>9.3f} {r['ratio_topk']:>6.2f}"
        )
    for r in rows:
        if "breakdown_ms" in r:
            print(
                f"breakdown M={r['M']}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in r["breakdown_ms"].items())
            )
    if args.json:
        data = {
            "encode_decode_vs_matmul": {str(r["M"]): round(r["ratio"], 4) for r in rows},
            "topk_path_vs_matmul": {str(r["M"]): round(r["ratio_topk"], 4) for r in rows},
            "device": str(device),
            "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
