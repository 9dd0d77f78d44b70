"""SAeUron's published concept statistics (a Python pickle of per-prompt, per-step mean codes) -> ConceptStats."""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import Tensor

from ..concept_stats import ConceptStats
from ..errors import ConceptFileError, SAEInputError, TrustRequiredError


def ddim_leading_timesteps(steps: int, train_steps: int = 1000, offset: int = 1) -> Tensor:
    """Model timesteps of diffusers' DDIM with "leading" spacing and steps_offset (SD 1.x defaults):
    step i (0 = first, noisiest) -> (steps - 1 - i) * (train_steps // steps) + offset."""
    ratio = train_steps // steps
    return (torch.arange(steps - 1, -1, -1, dtype=torch.float64) * ratio + offset)


def import_saeuron_stats(path: str | os.PathLike, *, trust: bool = False, timesteps: Tensor | None = None) -> ConceptStats:
    """Read SAeUron's ``*_latents_dict_<hookpoint>.pkl`` ({concept: [prompts, steps, M] per-prompt, per-step mean
    codes}) into ConceptStats (counts = prompts per concept). Timesteps default to 100-step DDIM "leading" spacing
    (991 ... 1), the schedule those files were gathered with; pass ``timesteps`` [steps] otherwise.

    The file is a Python pickle, which can run arbitrary code when loaded: this refuses unless ``trust=True``.
    Use it offline on files you trust, then save the built dictionary as a safetensors concept file.
    """
    path = os.fspath(path)
    if not trust:
        raise TrustRequiredError(
            f"{path}: SAeUron statistics are a Python pickle, which can execute code when loaded; refusing to unpickle. "
            "If you trust this file, call import_saeuron_stats(path, trust=True) from Python (the command line never "
            "unpickles), build the dictionary and share it as a safetensors concept file"
        )
    import pickle

    with open(path, "rb") as fh:
        raw = pickle.load(fh)  # noqa: S301 - the caller vouched for the file (trust=True)
    if not isinstance(raw, Mapping) or not raw:
        raise ConceptFileError(f"{path}: expected a non-empty dict {{concept: tensor [prompts, steps, M]}}, found {type(raw).__name__}")
    names, means, counts = [], [], []
    shape = None
    for name, t in raw.items():
        t = torch.as_tensor(t)
        if t.ndim != 3:
            raise ConceptFileError(f"{path}: concept {name!r} has shape {tuple(t.shape)}, expected [prompts, steps, M]")
        if shape is not None and tuple(t.shape[1:]) != shape:
            raise ConceptFileError(f"{path}: concept {name!r} has [steps, M] = {tuple(t.shape[1:])}, others have {shape}")
        shape = tuple(t.shape[1:])
        names.append(str(name))
        means.append(t.double().mean(0))
        counts.append(float(t.shape[0]))
    steps = shape[0]
    ts = ddim_leading_timesteps(steps) if timesteps is None else torch.as_tensor(timesteps, dtype=torch.float64)
    if ts.shape != (steps,):
        raise SAEInputError(f"{path}: {steps} steps in the file but timesteps has shape {tuple(ts.shape)}")
    cnt = torch.tensor(counts, dtype=torch.float64)[:, None].expand(len(names), steps).clone()
    return ConceptStats(tuple(names), ts, torch.stack(means), cnt)
