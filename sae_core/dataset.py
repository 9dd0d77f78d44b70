"""The activation dataset folder: sharded safetensors files of rows [n, d] with their float64 moments, and a
manifest; ShardWriter writes one (atomically, shard by shard), ActivationDataset reads and validates one.

A dataset folder holds ``shard_00000.safetensors``, ``shard_00001.safetensors``, ... (tensor ``acts`` [rows, d]
plus the float64 per-channel ``sum`` and ``sumsq`` of the shard, so a trainer gets exact statistics without
reading the rows) and ``manifest.json`` (what was recorded: model fingerprint, block, input space, branches,
prompts, sampler settings, counts). Every file is written to a temporary name and renamed, so a folder never
holds a half-written shard; the manifest is rewritten after every shard (``complete`` false until ``close``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import SAEFormatError
from .files import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

FORMAT = "sae-concept-eraser/activations"
VERSION = 1
MANIFEST = "manifest.json"
_MOMENT_CHUNK = 8192
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def write_json_atomic(path: Path, data: Mapping) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str), what="dataset manifest")


class ShardWriter:
    """Buffers rows [n, d] and writes a shard whenever ``shard_rows`` are full; ``close`` writes the rest."""

    def __init__(self, folder: str | Path, shard_rows: int, dtype: str = "float16", meta: Mapping[str, Any] | None = None,
                 overwrite: bool = False):
        self.folder = Path(folder)
        if (self.folder / MANIFEST).exists() and not overwrite:
            raise SAEFormatError(
                f"{self.folder}: already holds a dataset ({MANIFEST}); choose a new folder or allow overwriting"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("shard_*.safetensors"):
            old.unlink()
        self.shard_rows, self.dtype = int(shard_rows), DTYPES[dtype]
        self.meta = dict(meta or {})
        self.d: int | None = None
        self.buf: Tensor | None = None
        self.fill = 0
        self.shards: list[dict[str, Any]] = []
        self.rows = 0
        self.started = time.time()

    def add(self, rows: Tensor) -> None:
        rows = rows.detach()
        if rows.ndim != 2:
            raise ValueError(f"ShardWriter.add: expected rows [n, d], found shape {tuple(rows.shape)}")
        if self.d is None:
            self.d = int(rows.shape[1])
            self.buf = torch.empty(self.shard_rows, self.d, dtype=self.dtype)
        elif rows.shape[1] != self.d:
            raise ValueError(f"ShardWriter.add: rows have {rows.shape[1]} channels, earlier rows had {self.d}")
        i = 0
        while i < rows.shape[0]:
            take = min(self.shard_rows - self.fill, rows.shape[0] - i)
            self.buf[self.fill:self.fill + take].copy_(rows[i:i + take])
            self.fill += take
            i += take
            if self.fill == self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        if not self.fill:
            return
        acts = self.buf[: self.fill]  # a contiguous view: no copy of the shard
        total = torch.zeros(self.d, dtype=torch.float64)
        total_sq = torch.zeros(self.d, dtype=torch.float64)
        for i in range(0, self.fill, _MOMENT_CHUNK):  # float64 moments in chunks, never a float64 copy of the shard
            x = acts[i:i + _MOMENT_CHUNK].double()
            total += x.sum(0)
            total_sq += x.pow(2).sum(0)
        tensors = {"acts": acts, "sum": total, "sumsq": total_sq}
        name = shard_name(len(self.shards))
        atomic_write(self.folder / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT + "/shard"}),
                     what="activation shard")
        self.shards.append({"file": name, "rows": self.fill})
        self.rows += self.fill
        self.fill = 0
        self.write_manifest(complete=False)
        logger.info("wrote %s (%d rows, %d in all)", name, self.shards[-1]["rows"], self.rows)

    def manifest(self, complete: bool) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": VERSION, "complete": complete, "d_in": self.d,
                "dtype": str(self.dtype).removeprefix("torch."), "rows": self.rows, "shard_rows": self.shard_rows,
                "shards": list(self.shards), "seconds": round(time.time() - self.started, 3), **self.meta}

    def write_manifest(self, complete: bool) -> None:
        write_json_atomic(self.folder / MANIFEST, self.manifest(complete))

    def close(self, **meta: Any) -> dict[str, Any]:
        """Write the last partial shard and the final manifest (``meta`` merged in); returns the manifest."""
        self.meta.update(meta)
        self._flush()
        if not self.shards:
            raise SAEFormatError(f"{self.folder}: nothing was recorded; was the block run with the collector attached?")
        self.write_manifest(complete=True)
        return self.manifest(True)


@dataclass
class ActivationDataset:
    """A dataset folder, validated: its manifest and shard list (rows per shard)."""

    folder: Path
    manifest: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, folder: str | Path) -> ActivationDataset:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise SAEFormatError(
                f"{folder}: no {MANIFEST}; expected a folder written by `python -m sae_core collect` (or the "
                "Collect Activations node)"
            )
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SAEFormatError(f"{path}: not readable JSON ({e}); collect the activations again") from e
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            found = m.get("format") if isinstance(m, dict) else type(m).__name__
            raise SAEFormatError(f"{path}: format is {found!r}, expected {FORMAT!r}")
        if int(m.get("format_version", 0)) > VERSION:
            raise SAEFormatError(f"{path}: format_version {m['format_version']} is newer than this pack reads ({VERSION}); update the pack")
        shards = m.get("shards") or []
        if not shards or not isinstance(m.get("d_in"), int):
            raise SAEFormatError(f"{path}: holds no shards (rows {m.get('rows')}); the collection recorded nothing")
        for s in shards:
            if not (folder / s["file"]).is_file():
                raise SAEFormatError(f"{folder / s['file']}: listed in {MANIFEST} but missing; copy the whole folder")
        if not m.get("complete", False):
            logger.warning("%s: the collection did not finish; using the %d shards written", folder, len(shards))
        return cls(folder, m, list(shards))

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    def rows(self, i: int) -> int:
        return int(self.shards[i]["rows"])

    def _open(self, i: int):
        path = self.folder / self.shards[i]["file"]
        try:
            return path, safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise SAEFormatError(f"{path}: not a readable safetensors shard ({e}); collect the activations again") from e

    def load(self, i: int) -> Tensor:
        """Shard ``i``'s rows [rows, d] as stored (float16 by default)."""
        path, f = self._open(i)
        with f:
            if "acts" not in f.keys():
                raise SAEFormatError(f"{path}: no tensor 'acts' (found {sorted(f.keys())})")
            acts = f.get_tensor("acts")
        if acts.ndim != 2 or acts.shape != (self.rows(i), self.d_in):
            raise SAEFormatError(
                f"{path}: 'acts' has shape {tuple(acts.shape)}, expected ({self.rows(i)}, {self.d_in}) per {MANIFEST}"
            )
        return acts

    def moments(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, int]:
        """(mean [d], total variance per row, rows) over the shards ``indices``, in float64, from the stored sums."""
        s = torch.zeros(self.d_in, dtype=torch.float64)
        sq = torch.zeros_like(s)
        n = 0
        for i in indices:
            path, f = self._open(i)
            with f:
                s += f.get_tensor("sum")
                sq += f.get_tensor("sumsq")
            n += self.rows(i)
        mean = s / n
        total_var = float((sq / n - mean.pow(2)).sum())
        return mean, total_var, n
