"""Copy a training checkpoint into a small shippable one (fp16 weights + config with provenance).

    python -m shapes_world.train --out RUN --steps 8000 --seed 0      # writes RUN/step_NNNNNN snapshots
    python -m shapes_world.export --ckpt RUN/step_004713 --out shapes_world/weights

(the shipped weights are step 4713 of that run). The config records the snapshot's folder name, not its
path, so nothing of the machine it was exported on ends up in the shipped files.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from .model import load_model, save_model

logger = logging.getLogger(__name__)


def export(ckpt: Path, out: Path, dtype: torch.dtype = torch.float16, note: str = "") -> Path:
    model, config = load_model(ckpt)
    meta = {k: v for k, v in config.items() if k not in ("format", "model", "vocab")}
    meta.update({"exported_from": Path(ckpt).name, "dtype": str(dtype).removeprefix("torch.")})
    if note:
        meta["note"] = note
    return save_model(model, out, meta, dtype=dtype)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fp32", action="store_true", help="keep float32 instead of float16")
    p.add_argument("--note", default="")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    export(a.ckpt, a.out, torch.float32 if a.fp32 else torch.float16, a.note)
    logger.info("exported %s -> %s", a.ckpt, a.out)


if __name__ == "__main__":
    main()
