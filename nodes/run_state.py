"""Per-run state of one patch and the sampler wrapper that opens and closes a run (OUTER_SAMPLE), with look-ahead's
two passes inside it. Shared by the UNet block patch (nodes/hook.py) and the DiT block patch (nodes/dit_hook.py).

Nothing here imports ComfyUI. Newer ComfyUI can run one step's chunks in threads on several devices
(``multigpu_clones``): the run state is shared by every device's thread, so its counters and caches take a lock.
"""

from __future__ import annotations

import copy
import logging
import threading

import torch

try:  # inside ComfyUI the pack is a package and sae_core its sibling
    from ..sae_core.lookahead import guide_from_recorder
    from ..sae_core.mixins import SharedOnCopy
    from ..sae_core.steps import StepInfo
except ImportError:  # imported as top-level `nodes` (tests, scripts) with sae_core on sys.path
    from sae_core.lookahead import guide_from_recorder
    from sae_core.mixins import SharedOnCopy
    from sae_core.steps import StepInfo

from .comfy_steps import step_info  # noqa: E402 - after the sae_core imports

logger = logging.getLogger(__name__)

OPTIONS_KEY = "sae_concept_eraser"  # model_options["transformer_options"][OPTIONS_KEY] = {patch id: RunState}
WRAPPER_PREFIX = "sae_concept_eraser."


class RunState(SharedOnCopy):
    """Per-patch state shared by the object patch, the OUTER_SAMPLE wrapper and the DETECTIONS output.

    Shared on copy: every clone of the patched model must see one run state (it carries the recorder the
    Mask Preview reads and the active-run count the wrapper keeps). Several device threads of one run
    (multi-GPU) share it: what they write goes through ``lock``.
    """

    def __init__(self, label: str, recorder=None, key: str | None = None, intervention=None):
        self.label = label
        self.key = key  # the patched block's ComfyUI key, for messages
        self.recorder = recorder
        self.intervention = intervention  # reset at every run (per-run memory); runs its look-ahead passes
        self.model_sampling = None
        self.schedule: dict = {}  # device -> (sample_sigmas object, its host copy), filled by the run's calls
        self.window = UNSET
        self.active = 0
        self.runs = 0
        self.hits: dict[str, int] = {}  # device -> block calls seen by the patch in the current run
        self.warnings: list[str] = []  # what the last run found wrong (shown by Mask Preview, logged)
        self.notify = None  # callable(text) that shows a warning in the UI; set by the node, optional
        self.lock = threading.Lock()

    def begin(self, model_sampling) -> None:
        if self.recorder is not None:
            self.recorder.reset()
        sampling = host_sampling(model_sampling)
        if self.intervention is not None and hasattr(self.intervention, "reset"):
            self.intervention.reset()
        with self.lock:
            self.model_sampling = sampling
            self.schedule = {}
            self.window = UNSET
            self.hits = {}
            self.warnings = []
            self.active += 1
            self.runs += 1

    def end(self, ok: bool = True) -> None:
        with self.lock:
            self.active = max(0, self.active - 1)
            if not self.active:
                self.model_sampling = None
        if ok:
            self._check_hooked()

    def step_in_window(self, transformer_options, window_of, default_device) -> StepInfo | None:
        """StepInfo of one block call of this run, or None outside the run's step window (``window_of(model_sampling)``
        gives it, computed once per run; None = every step). Counts the call per device for ``_check_hooked``."""
        step = step_info(transformer_options, self.model_sampling, self)
        device = transformer_options.get("multigpu_thread_device") if isinstance(transformer_options, dict) else None
        name = str(device if device is not None else default_device)
        with self.lock:
            self.hits[name] = self.hits.get(name, 0) + 1
        if window_of is None:
            return step
        window = self.window
        if window is UNSET:  # once per run (two device threads may both compute it: same value)
            window = self.window = window_of(self.model_sampling)
        return step if window is None or window.contains(step) else None

    def host_schedule(self, sample_sigmas, device):
        """The run's sample_sigmas on the host, cached per device (multi-GPU threads get a copy per call)."""
        name = str(device)
        hit = self.schedule.get(name)
        if hit is not None and hit[0] is sample_sigmas:
            return hit[1]
        host = torch.as_tensor(sample_sigmas).detach().cpu()
        with self.lock:
            self.schedule[name] = (sample_sigmas, host)
        return host

    def _check_hooked(self) -> None:
        """A run of the patched model that never reached our block patch: something replaced it."""
        if sum(self.hits.values()):
            return
        where = self.key or "its block"
        text = (
            f"{self.label}: the sampling run never called the SAE patch on {where}, so nothing was detected or "
            "edited and nothing was recorded. A node applied after this one replaced that block's forward "
            "without chaining it (an object patch, or for FLUX / SD3 a DiT replace patch, on the same block), or the "
            "model sampled is not the one this node patched. Put this node after the other patch node, or remove the other patch"
        )
        self.warnings.append(text)
        logger.warning("%s", text)
        if self.notify is not None:
            try:
                self.notify(text)
            except Exception as e:  # the UI message is a courtesy; the log line above stays
                logger.debug("could not show the warning in the UI: %s", e)

    def __repr__(self) -> str:
        n = 0 if self.recorder is None else len(self.recorder.records)
        return f"RunState({self.label!r}, runs={self.runs}, records={n})"


UNSET = object()


def host_sampling(model_sampling):
    """A CPU copy of ``model_sampling`` when its schedule lives on an accelerator, so that sigma -> timestep and
    percent -> sigma need no device synchronisation inside the hook; else ``model_sampling`` itself."""
    if not isinstance(model_sampling, torch.nn.Module):
        return model_sampling
    if all(t.device.type == "cpu" for t in [*model_sampling.buffers(), *model_sampling.parameters()]):
        return model_sampling
    try:
        return copy.deepcopy(model_sampling).to("cpu")
    except Exception as e:  # an unusual sampling object: the device one is correct, only slower
        logger.debug("model_sampling stays on its device (%s)", e)
        return model_sampling


def make_outer_sample_wrapper(state: RunState):
    """OUTER_SAMPLE wrapper: reset the recorder and bind model_sampling for this run; release in finally.
    With a look-ahead intervention it samples twice from the same noise (see ``sample_with_lookahead``)."""

    def wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        state.begin(guider.model_patcher.get_model_object("model_sampling"))
        ok = False
        try:
            iv = state.intervention
            if iv is not None and getattr(iv, "lookahead", None) is not None:
                out = sample_with_lookahead(executor, guider, iv, args, kwargs)
            else:
                out = executor(*args, **kwargs)
            ok = True
            return out
        finally:
            state.end(ok)

    return wrapper


def _snapshot_conds(guider):
    """A copy of the guider's conds as its sample() makes them (lists of copied dicts), or None if it has none."""
    conds = getattr(guider, "conds", None)
    if not isinstance(conds, dict):
        return None
    return {k: [c.copy() if hasattr(c, "copy") else c for c in v] for k, v in conds.items()}


def sample_with_lookahead(executor, guider, intervention, args: tuple, kwargs: dict):
    """Look-ahead inside one OUTER_SAMPLE call: pass 1 samples with edits off and records the detector's masks,
    pass 2 samples from the same noise (the same arguments; pass 1 gets copies of the tensors) and edits with
    pass 1's masks from the first step. The guider's conds are restored between the passes (outer_sample
    processes them in place). The intervention is back in one-pass mode after an error or interrupt."""
    conds = _snapshot_conds(guider)
    try:
        rec = intervention.begin_detect_pass()
        first = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        executor(*first, **kwargs)
        if conds is not None:
            guider.conds = {k: [c.copy() if hasattr(c, "copy") else c for c in v] for k, v in conds.items()}
        intervention.begin_edit_pass(guide_from_recorder(rec, intervention.detector, intervention.lookahead,
                                                         intervention.label))
        return executor(*args, **kwargs)
    finally:
        intervention.end_lookahead()
