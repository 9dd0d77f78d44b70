"""The block hook: an object patch on one SpatialTransformer forward and its per-run state (step identity:
nodes/comfy_steps.py; which block of which model: nodes/resolve.py).

Nothing here imports ComfyUI: the ModelPatcher, model_sampling and wrapper executor are used through
the few attributes ComfyUI gives them, so the logic is tested with small fakes as well as with the real
thing (tests/integration). Step identity: docs/FORMULAS.md section 9.

Newer ComfyUI can run one step's chunks in threads on several devices (``multigpu_clones``), each
device on its own deep clone of the model that carries the same object patches. Everything here is
found by feature detection (what an object has), never by version strings:
- the run state is shared by every device's thread: its counters and caches take a lock;
- a clone whose ``.model`` is another module tree (multi-GPU deep clones, non-dynamic delegates of a
  dynamic-VRAM patcher, ``force_deepcopy``) gets our object patch rebound to its own block, through an
  ON_CLONE callback, so the block runs that device's weights.
"""

from __future__ import annotations

import copy
import logging
import threading
import uuid
from typing import Callable

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
        self.window = _UNSET
        self.active = 0
        self.runs = 0
        self.calls = 0  # block calls inside the step window in the current run (diagnostics, never step identity)
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
            self.window = _UNSET
            self.calls = 0
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

    def count(self, device, in_window: bool) -> None:
        with self.lock:
            name = str(device)
            self.hits[name] = self.hits.get(name, 0) + 1
            if in_window:
                self.calls += 1

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


_UNSET = object()


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


# ------------------------------------------------------------------------------------------------
# the patch


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """(x, transformer_options) of a SpatialTransformer.forward(x, context=None, transformer_options={}) call."""
    x = args[0] if args else kwargs["x"]
    if len(args) > 2:
        to = args[2]
    else:
        to = kwargs.get("transformer_options", {})
    return x, to


Intervention = Callable[[torch.Tensor, torch.Tensor, StepInfo], torch.Tensor]


def make_forward(prev: Callable, intervention: Intervention, state: RunState, window_of: Callable | None = None):
    """Forward replacement: run ``prev`` (the original or an earlier patch), then the intervention.

    Outside a run of this patch's sampler (state not active) it is the identity around ``prev``, so a
    patch that ComfyUI left applied to the module cannot act on another model's run.
    ``window_of(model_sampling)`` gives the StepWindow (or None) of this run.
    """

    def forward(*args, **kwargs):
        out = prev(*args, **kwargs)
        if not state.active:
            return out
        x, to = _split_call(args, kwargs)
        device = to.get("multigpu_thread_device") if isinstance(to, dict) else None
        step = step_info(to, state.model_sampling, state)
        if window_of is not None:
            window = state.window
            if window is _UNSET:  # once per run (two device threads may both compute it: same value)
                window = state.window = window_of(state.model_sampling)
            if window is not None and not window.contains(step):
                state.count(device if device is not None else x.device, False)
                return out
        state.count(device if device is not None else x.device, True)
        return intervention(x, out, step)

    forward.sae_state = state  # lets tests and chained patches see what is installed
    forward.sae_prev = prev
    forward.sae_rebuild = lambda new_prev: make_forward(new_prev, intervention, state, window_of)
    return forward


def rebind_forward(fn: Callable, module: torch.nn.Module) -> Callable:
    """``fn`` (our forward, a chain of them, or a bound forward) made to run ``module`` instead of the block it
    was built on. Patches of other packs are kept as they are (they may hold the other block: warned)."""
    if getattr(fn, "sae_module", None) is module:
        return fn
    if hasattr(fn, "sae_rebuild"):
        new = fn.sae_rebuild(rebind_forward(fn.sae_prev, module))
        new.sae_module = module
        return new
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        if owner is module:
            return fn
        return fn.__func__.__get__(module)  # the same method, bound to this model's block
    logger.warning(
        "SAE patch: the block under our patch carries another pack's forward patch (%r) that cannot be moved to a "
        "deep clone of the model (multi-GPU device or memory delegate); that device may run the other block",
        fn,
    )
    return fn


def make_rebind_callback(key: str):
    """ON_CLONE callback: a clone with its own module tree gets our patch on ``key`` bound to its own block."""
    name = key + ".forward"

    def on_clone(old, new):
        if getattr(new, "model", None) is getattr(old, "model", None):
            return  # the usual clone: same modules, the patch is right as it is
        patches = getattr(new, "object_patches", None)
        fn = None if patches is None else patches.get(name)
        if fn is None or not hasattr(fn, "sae_rebuild"):
            return
        module = new.model
        for part in key.split("."):
            module = getattr(module, part)
        patches[name] = rebind_forward(fn, module)

    return on_clone


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
ON_CLONE = "on_clone"  # comfy.patcher_extension.CallbacksMP.ON_CLONE (same string in every ComfyUI with callbacks)


def install_patch(model, key: str, intervention: Intervention, state: RunState, wrapper_type: str,
                  window_of: Callable | None = None):
    """Clone ``model`` and patch ``key``'s forward (chaining any earlier patch). Returns the clone.
    DiT blocks (FLUX, SD3) get a ``patches_replace["dit"]`` patch instead: nodes/dit_hook.py."""
    from . import dit_hook

    if dit_hook.is_dit_key(key):
        return dit_hook.install_dit_patch(model, key, intervention, state, wrapper_type, window_of)
    m = model.clone()
    if state.key is None:
        state.key = key
    prev = m.get_model_object(key + ".forward")
    m.add_object_patch(key + ".forward", make_forward(prev, intervention, state, window_of))
    patch_id = WRAPPER_PREFIX + uuid.uuid4().hex[:12]
    if hasattr(m, "add_callback_with_key"):  # ComfyUI with patcher callbacks: rebind on clones with their own model
        m.add_callback_with_key(ON_CLONE, patch_id, make_rebind_callback(key))
    m.add_wrapper_with_key(wrapper_type, patch_id, make_outer_sample_wrapper(state))
    m.model_options.setdefault("transformer_options", {}).setdefault(OPTIONS_KEY, {})[patch_id] = state
    return m
