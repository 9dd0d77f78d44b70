"""The block hook: an object patch on one SpatialTransformer forward (DiT blocks: nodes/dit_hook.py; the per-run
state and the sampler wrapper: nodes/run_state.py; step identity: nodes/comfy_steps.py; which block of which
model: nodes/resolve.py).

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

import logging
import uuid
from typing import Callable

import torch

try:  # inside ComfyUI the pack is a package and sae_core its sibling
    from ..sae_core.steps import StepInfo
except ImportError:  # imported as top-level `nodes` (tests, scripts) with sae_core on sys.path
    from sae_core.steps import StepInfo

from . import dit_hook  # noqa: E402 - after the sae_core imports
from .run_state import OPTIONS_KEY, WRAPPER_PREFIX, RunState, make_outer_sample_wrapper  # noqa: E402

logger = logging.getLogger(__name__)



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
        step = state.step_in_window(to, window_of, x.device)
        return out if step is None else intervention(x, out, step)

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


ON_CLONE = "on_clone"  # comfy.patcher_extension.CallbacksMP.ON_CLONE (same string in every ComfyUI with callbacks)


def install_patch(model, key: str, intervention: Intervention, state: RunState, wrapper_type: str,
                  window_of: Callable | None = None):
    """Clone ``model`` and patch ``key``'s forward (chaining any earlier patch). Returns the clone.
    DiT blocks (FLUX, SD3) get a ``patches_replace["dit"]`` patch instead: nodes/dit_hook.py."""
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
