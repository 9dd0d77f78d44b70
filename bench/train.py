"""Benchmark: SAE training throughput against the bare GEMMs of the same size, and 2 processes against 1.

    python bench/train.py                                   # CPU-sized defaults (d 320, M 4096, k 32, batch 2048)
    python bench/train.py --d 1280 --latents 20480 --k 32 --batch 4096 --device cuda   # SAeUron's SD 1.5 size
    python bench/train.py --dp                              # also the torchrun speed-up (CPU, gloo)

1. In one process, on the same random rows and sizes, medians after warm-up of
     trainer   one SAETrainer.step (encode, TopK, sparse decode, FVU + AuxK with a quarter of the latents dead,
               backward, gradient projection, Adam, decoder renormalisation)
     gemm      the floor: encoder and decoder as dense GEMMs, forward and backward
               (pre = x W_enc^T; y = pre W_dec; backward gives dW_enc, dx, dW_dec, dpre: six B x d x M products)
   and the ratio trainer rows/s over gemm rows/s (target >= 0.8).
2. With --dp: the same `python -m sae_core train` on a synthetic dataset with 1 process and under
   `torchrun --nproc_per_node 2`, each process with --threads (default 1) CPU threads, the in-loop rows/s
   (median of the logged values, the first skipped) and the speed-up (target >= 1.8 where the machine has
   a free core per process; on a machine with 2 cores shared with other work expect less).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae_core.dataset import ShardWriter  # noqa: E402
from sae_core.trainer import SAETrainer, StreamConfig  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_time(fn, dev, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_step(d: int, M: int, k: int, B: int, dev: torch.device, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g).to(dev)
    cfg = StreamConfig(n_latents=M, k=k, dead_after_tokens=10 * B)
    tr = SAETrainer(d, cfg, torch.zeros(d), float(d), dev)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[: M // 4] = True  # AuxK active, as early in real training
    tr.since_fired[dead.to(dev)] = 100 * B

    def step():
        tr.step(x, B)
        tr.since_fired[dead.to(dev)] = 100 * B

    t_trainer = _median_time(step, dev, repeats)

    W_enc = (torch.randn(M, d, generator=g) / d**0.5).to(dev).requires_grad_(True)
    W_dec = (torch.randn(M, d, generator=g) / d**0.5).to(dev).requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    amp = dev.type == "cuda" and torch.cuda.is_bf16_supported()

    def gemms():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            pre = xg @ W_enc.T
            y = pre @ W_dec
        y.float().sum().backward()
        W_enc.grad = W_dec.grad = xg.grad = None

    t_gemm = _median_time(gemms, dev, repeats)
    return {"d": d, "latents": M, "k": k, "batch": B, "device": str(dev), "bf16_autocast": tr.amp,
            "trainer_s": t_trainer, "gemm_s": t_gemm, "trainer_rows_per_s": B / t_trainer, "gemm_rows_per_s": B / t_gemm,
            "ratio": t_gemm / t_trainer}


def _rows_per_s(stdout: str) -> float:
    vals = [float(v) for v in re.findall(r"(\d+) rows/s", stdout)]
    if len(vals) < 2:
        raise RuntimeError(f"no throughput in the training output:\n{stdout}")
    return statistics.median(vals[1:])


def bench_dp(d: int, M: int, k: int, B: int, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        w = ShardWriter(Path(tmp) / "ds", 16384, "float16")
        g = torch.Generator().manual_seed(0)
        for _ in range(8):
            w.add(torch.randn(16384, d, generator=g))
        w.close()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        res = {}
        for n in (1, 2):
            args = ["-m", "sae_core", "train", str(Path(tmp) / "ds"), "--out", str(Path(tmp) / f"s{n}.safetensors"),
                    "--latents", str(M), "--k", str(k), "--batch-size", str(B), "--steps", str(steps),
                    "--log-every", "5", "--threads", str(threads), "--device", "cpu", "--holdout-shards", "1",
                    "--checkpoint-every", "0"]
            if n > 1:
                args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]
            r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(r.stdout + r.stderr)
            res[n] = _rows_per_s(r.stdout)
    return {"threads_per_process": threads, "cpu_count": os.cpu_count(), "rows_per_s_1": res[1], "rows_per_s_2": res[2],
            "speedup": res[2] / res[1]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=320)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (per process for --dp)")
    p.add_argument("--dp", action="store_true", help="also measure torchrun with 2 processes against 1 (CPU)")
    p.add_argument("--dp-steps", type=int, default=40)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    r = {"step": bench_step(a.d, a.latents, a.k, a.batch, dev, a.repeats)}
    s = r["step"]
    print(f"d {a.d}, M {a.latents}, k {a.k}, batch {a.batch} on {dev} ({a.threads} thread(s))")
    print(f"{'':10s} {'ms/step':>10s} {'rows/s':>12s}")
    print(f"{'trainer':10s} {s['trainer_s'] * 1e3:10.2f} {s['trainer_rows_per_s']:12.0f}")
    print(f"{'gemm':10s} {s['gemm_s'] * 1e3:10.2f} {s['gemm_rows_per_s']:12.0f}")
    print(f"trainer / gemm floor (rows/s): {s['ratio']:.2f}  (target >= 0.8)")
    if a.dp:
        dp = bench_dp(a.d, a.latents, a.k, a.batch, a.dp_steps, a.threads)
        r["dp"] = dp
        print(f"torchrun: 1 process {dp['rows_per_s_1']:.0f} rows/s, 2 processes {dp['rows_per_s_2']:.0f} rows/s, "
              f"speed-up {dp['speedup']:.2f}x ({dp['cpu_count']} CPU(s) here, {a.threads} thread(s) per process)")
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
