"""Step identity of one model call inside ComfyUI's sampler (sigma -> timestep, the schedule step, the CFG chunk
layout) and the sampling window in sigma. Nothing here imports ComfyUI (fakes in tests/test_nodes_logic.py).
Formulas: docs/FORMULAS.md section 9."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

try:  # inside ComfyUI the pack is a package and sae_core its sibling
    from ..sae_core.errors import SAEInputError
    from ..sae_core.steps import StepInfo, StepWindow
except ImportError:  # imported as top-level `nodes` (tests, scripts) with sae_core on sys.path
    from sae_core.errors import SAEInputError
    from sae_core.steps import StepInfo, StepWindow

if TYPE_CHECKING:
    from .run_state import RunState


def step_index(sigma: float, sample_sigmas) -> int | None:
    """Index of the schedule step a model call at ``sigma`` belongs to.

    The largest j with sample_sigmas[j] >= sigma (relative tolerance 1e-5): exact schedule sigmas map to
    their own index, the extra evaluations of 2nd-order samplers (between s_j and s_j+1) to j.
    """
    if sample_sigmas is None:
        return None
    s = torch.as_tensor(sample_sigmas, dtype=torch.float64).flatten().cpu()
    if s.numel() == 0:
        return None
    hit = torch.nonzero(s >= float(sigma) * (1.0 - 1e-5)).flatten()
    return int(hit[-1]) if hit.numel() else None


def step_info(transformer_options: dict, model_sampling, state: RunState | None = None) -> StepInfo:
    """StepInfo of one UNet call from ComfyUI's transformer_options (sigmas, cond_or_uncond, sample_sigmas).

    One device -> host read (the sigma) when ``model_sampling`` is on the CPU (see host_sampling) and ``state``
    caches the run's schedule."""
    sigmas = transformer_options.get("sigmas")
    if sigmas is None:
        raise SAEInputError(
            "SAE hook: transformer_options has no 'sigmas'; the model was called outside ComfyUI's sampler. "
            "Sample with a KSampler / SamplerCustom node"
        )
    sig = torch.as_tensor(sigmas).flatten()[:1]
    if isinstance(model_sampling, torch.nn.Module) and all(
            t.device.type == "cpu" for t in model_sampling.buffers()):
        sig = sig.cpu()
    chunks = tuple(int(c) for c in transformer_options.get("cond_or_uncond") or (0,))
    t = model_sampling.timestep(sig.float())
    sample_sigmas = transformer_options.get("sample_sigmas")
    if state is not None and sample_sigmas is not None:
        sample_sigmas = state.host_schedule(sample_sigmas, transformer_options.get("multigpu_thread_device"))
    s = float(sig[0])
    return StepInfo(
        timestep=float(torch.as_tensor(t).flatten()[0]),
        sigma=s,
        chunks=chunks,
        step_index=step_index(s, sample_sigmas),
    )


def check_window(start_percent: float, end_percent: float) -> None:
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise SAEInputError(
            f"start_percent {start_percent} and end_percent {end_percent}: expected 0 <= start <= end <= 1 "
            "(0 = first step, 1 = last step)"
        )


def sigma_window(model_sampling, start_percent: float, end_percent: float) -> StepWindow | None:
    """Sampling window in sigma as core nodes compute it (percent_to_sigma); None = every step."""
    check_window(start_percent, end_percent)
    if start_percent <= 0.0 and end_percent >= 1.0:
        return None
    return StepWindow(
        sigma_min=float(model_sampling.percent_to_sigma(end_percent)),
        sigma_max=float(model_sampling.percent_to_sigma(start_percent)),
    )
