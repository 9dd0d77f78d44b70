"""Collect the shapes model's block activations into a dataset folder, as ``python -m sae_core collect`` does for
diffusers pipelines: the same arguments, the same files (sae_core.collect), the shapes model's own DDIM sampler.

    python -m shapes_world.scenes --n 768 --seed 30000001 > prompts.txt
    python -m shapes_world.collect --model shapes_world/weights --block up_blocks.1.attentions.1 \
        --prompts prompts.txt --out acts --threads 1

The core knows nothing of the shapes world: its CLI takes this module's ``collect_shapes`` as the driver.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from sae_core.collect import (
    ActivationRecorder,
    CollectResult,
    CollectSettings,
    _block_name,
    _prompt_batches,
    model_fingerprint,
)
from sae_core.dataset import ShardWriter

from .render import render


def collect_shapes(model, prompts: Sequence[str], block: str, out: str | Path, settings: CollectSettings | None = None,
                   *, steps: int = 20, guidance: float = 3.0, seed: int = 0, batch: int = 32, model_id: str | None = None,
                   progress=None, overwrite: bool = False) -> CollectResult:
    """The same for the repository's shapes-world model (``shapes_world.model.ShapesModel``, DDIM, [cond; uncond])."""
    settings = settings or CollectSettings()
    name = _block_name(model.unet, block)
    sampler = {"host": "shapes_world", "scheduler": "DDIMScheduler", "steps": steps, "guidance": guidance,
               "seed": seed, "batch": batch}
    meta = {"model": {"id": model_id, "fingerprint": model_fingerprint(model), "class": type(model).__name__},
            "block": name, "input_space": settings.input_space, "branches": settings.branches,
            "prompts": list(prompts), "sampler": sampler}
    writer = ShardWriter(out, settings.shard_rows, settings.dtype, meta, overwrite=overwrite)
    rec = ActivationRecorder(writer, settings, label=name)
    batches = _prompt_batches(prompts, batch)
    for bi, ps in enumerate(batches):
        render(model, ps, seed=seed + bi * batch, steps=steps, cfg=guidance, interventions={name: rec})
        if progress is not None:
            progress(bi + 1, len(batches))
    return CollectResult(writer.close(recorder=rec.summary()))


def _load_and_collect(args, prompts, settings, dev, progress):
    from .model import load_model

    model, _ = load_model(args.model, device=dev)
    return collect_shapes(model, prompts, args.block, args.out, settings, steps=args.steps,
                          guidance=3.0 if args.guidance is None else args.guidance, seed=args.seed,
                          batch=args.batch or 32, model_id=Path(args.model).name, progress=progress,
                          overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    from sae_core.cli_train import main_collect

    return main_collect(argv, driver=_load_and_collect, prog="python -m shapes_world.collect")


if __name__ == "__main__":
    sys.exit(main())
