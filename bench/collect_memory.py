"""Measure: collection memory is bounded by the shard size, not by how much is collected.

    python bench/collect_memory.py [--d 1280] [--json out.json]

Each case runs in a fresh process: an ActivationRecorder + ShardWriter receive SD 1.5-sized block outputs
(batch [uncond; cond] of d x 16 x 16 maps, the cond rows recorded, float16 shards written to a temporary folder),
and the process reports its peak resident memory. The baseline process makes the same tensors without recording.
Peak minus baseline is printed next to the shard buffer (shard_rows x d x 2 bytes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import resource, sys, torch
sys.path.insert(0, {root!r})
from sae_core.collect import ActivationRecorder, CollectSettings
from sae_core.dataset import ShardWriter
from sae_core.intervention import StepInfo
torch.set_num_threads(1)
d, rows, shard, folder = {d}, {rows}, {shard}, {folder!r}
rec = None
if shard:
    w = ShardWriter(folder, shard, "float16")
    rec = ActivationRecorder(w, CollectSettings(shard_rows=shard))
g = torch.Generator().manual_seed(0)
for i in range(rows // 256):
    out = torch.randn(2, d, 16, 16, generator=g)
    if rec is not None:
        rec(None, out, StepInfo(999.0 - i % 1000, chunks=(1, 0), step_index=i % 20))
if rec is not None:
    w.close()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak(d: int, rows: int, shard: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        code = CHILD.format(root=str(ROOT), d=d, rows=rows, shard=shard, folder=str(Path(tmp) / "ds"))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return int(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=1280)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    base = peak(a.d, 51_200, 0)
    cases = [(51_200, 8192), (102_400, 8192), (102_400, 32_768)]
    print(f"d {a.d}; baseline peak (no recording) {base / 2**20:.0f} MiB")
    print(f"{'rows collected':>15s} {'shard rows':>11s} {'buffer MiB':>11s} {'peak - baseline MiB':>20s}")
    res = {"d": a.d, "baseline_bytes": base, "cases": []}
    for rows, shard in cases:
        extra = peak(a.d, rows, shard) - base
        buf = shard * a.d * 2
        res["cases"].append({"rows": rows, "shard_rows": shard, "buffer_bytes": buf, "extra_bytes": extra})
        print(f"{rows:15d} {shard:11d} {buf / 2**20:11.1f} {extra / 2**20:20.1f}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
