"""Host adapter for any nn.Module tree (e.g. a diffusers UNet2DConditionModel): attach interventions
to named submodules for the duration of a ``with`` block; every hook is removed in ``finally``."""

from __future__ import annotations

import dataclasses
import difflib
import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import SAEInputError, SAELookupError, SAEStateError, SAETypeError
from .intervention import BlockIntervention, StepInfo

logger = logging.getLogger(__name__)


class StepHolder:
    """Mutable step description the caller updates once per denoising step (e.g. in a pipeline callback)."""

    def __init__(self, step: StepInfo | None = None):
        self.step = step

    def set(self, step: StepInfo) -> None:
        self.step = step

    def __call__(self) -> StepInfo:
        if self.step is None:
            raise SAEStateError("StepHolder: no step set; call holder.set(StepInfo(...)) before running the model")
        return self.step


def _split_output(output) -> tuple[Tensor, Callable[[Tensor], object]]:
    """The hidden-states tensor of a block's output and a function rebuilding an output of the same kind."""
    if isinstance(output, Tensor):
        return output, lambda t: t
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return output[0], lambda t: (t, *output[1:])
    sample = getattr(output, "sample", None)
    if isinstance(sample, Tensor):
        if dataclasses.is_dataclass(output):
            return sample, lambda t: dataclasses.replace(output, sample=t)

        def rebuild(t):
            output.sample = t
            return output

        return sample, rebuild
    raise SAETypeError(
        f"hooked module returned {type(output).__name__}; expected a Tensor, a tuple starting with one, or an "
        "object with a .sample tensor (diffusers Transformer2DModelOutput)"
    )


def _block_input(args: tuple, kwargs: dict) -> Tensor | None:
    if args and isinstance(args[0], Tensor):
        return args[0]
    return kwargs.get("hidden_states")


def _make_hook(name: str, ivs: Sequence[BlockIntervention], step_of: Callable[[], StepInfo]):
    def hook(module, args, kwargs, output):
        x_out, rebuild = _split_output(output)
        x_in = _block_input(args, kwargs)
        step = step_of()
        y = x_out
        for iv in ivs:
            y = iv(x_in, y, step)
        return output if y is x_out else rebuild(y)

    return hook


@contextmanager
def attach_interventions(
    model: nn.Module,
    interventions: Mapping[str, BlockIntervention | Sequence[BlockIntervention]],
    step: Callable[[], StepInfo],
) -> Iterator[list]:
    """Attach ``interventions`` ({module name: intervention or list, applied in order}) to ``model``.

    ``step`` is called at every hooked forward and returns the current StepInfo (a StepHolder works).
    Entering resets the interventions' per-run memory: attach once per sampling run (or call ``iv.reset()``).
    Module names are those of ``model.named_modules()``, e.g. "up_blocks.1.attentions.1".
    """
    modules = dict(model.named_modules())
    missing = [n for n in interventions if n not in modules]
    if missing:
        hints = {n: difflib.get_close_matches(n, list(modules), n=3) for n in missing}
        raise SAELookupError(
            f"attach_interventions: {type(model).__name__} has no submodule(s) {missing}; close names: {hints}. "
            "Use names from model.named_modules()"
        )
    handles = []
    try:
        for name, ivs in interventions.items():
            seq = list(ivs) if isinstance(ivs, (list, tuple)) else [ivs]
            for iv in seq:  # a new run: forget the last one's per-run memory (presence gate, sticky masks)
                if hasattr(iv, "reset"):
                    iv.reset()
            handles.append(modules[name].register_forward_hook(_make_hook(name, seq, step), with_kwargs=True))
        logger.debug("attached interventions to %s", list(interventions))
        yield handles
    finally:
        for h in handles:
            h.remove()


@contextmanager
def track_timestep(
    model: nn.Module,
    holder: StepHolder,
    chunks: Sequence[int] = (1, 0),
    schedule: Sequence[float] | None = None,
) -> Iterator[StepHolder]:
    """Set ``holder`` from the ``timestep`` argument of every ``model`` call (a diffusers UNet's second
    positional argument or its ``timestep`` keyword), so the caller need not update it per step.

    chunks: the CFG layout of the batch, e.g. (1, 0) for diffusers' [uncond, cond], (0,) without CFG.
    schedule: the run's timesteps (e.g. scheduler.timesteps); when given, step_index = the nearest entry.
    """
    sched = None if schedule is None else torch.as_tensor(schedule, dtype=torch.float64).flatten()

    def pre(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise SAEInputError(
                f"track_timestep: {type(module).__name__} was called without a timestep (second positional argument "
                "or timestep=...); set the StepHolder yourself for this model"
            )
        tv = float(torch.as_tensor(t).detach().flatten()[0])
        idx = None if sched is None else int(torch.argmin((sched - tv).abs()))
        holder.set(StepInfo(tv, None, tuple(chunks), idx))

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield holder
    finally:
        handle.remove()
