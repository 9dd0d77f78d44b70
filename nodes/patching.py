"""Patching a model for Patch Replacer / SAE Steer: the intervention on the SAE's block, its run state, the SAE's
weights handed to ComfyUI's memory management, warnings shown in the UI."""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import torch

from ..sae_core.denoised import DenoisedFill
from ..sae_core.intervention import BlockIntervention
from ..sae_core.lookahead import LookAheadSettings
from ..sae_core.recorder import Recorder
from .comfy_steps import check_window, sigma_window
from .common import WARNING_EVENT, DetectorSpec, prompt_server, tell
from .hook import install_patch
from .resolve import resolve_hook
from .run_state import RunState

logger = logging.getLogger(__name__)


SAE_MODELS_KEY = "sae_concept_eraser"  # additional_models key of the SAE weights on a patched model


def _placeholder_patcher(load_device, offload_device, **_):
    """What ComfyUI's multi-GPU deep clone and non-dynamic delegates build from ``cached_patcher_init``: an
    empty module. Those devices use the SAE lazily cast and cached per device instead (the intervention
    casts the weights to each activation's device and dtype)."""
    return comfy.model_patcher.ModelPatcher(torch.nn.Module(), load_device, offload_device)


def sae_patcher(sae):
    """The SAE as a ComfyUI model: loaded to the sampling device with the model and offloaded with it."""
    load = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    patcher = comfy.model_patcher.ModelPatcher(sae, load, offload)
    if hasattr(patcher, "cached_patcher_init"):  # newer ComfyUI deep-clones additional models per device
        patcher.cached_patcher_init = (_placeholder_patcher, (load, offload))
    return patcher


def manage_sae_weights(patched, sae) -> bool:
    """Hand the SAE's weights to ComfyUI's memory management where the patcher supports additional models;
    else (False) they stay where they are and the intervention casts them lazily, cached per device/dtype."""
    if not (hasattr(patched, "set_additional_models") and hasattr(patched, "get_additional_models_with_key")):
        return False
    if not isinstance(sae, torch.nn.Module):
        return False
    have = list(patched.get_additional_models_with_key(SAE_MODELS_KEY))
    if not any(getattr(p, "model", None) is sae for p in have):
        patched.set_additional_models(SAE_MODELS_KEY, have + [sae_patcher(sae)])
    return True


def _ui_notifier(node_id):
    """callable(text): show a run's warning in the UI (a toast via our frontend extension, and the node's text);
    the hook has already logged it."""
    def notify(text: str) -> None:
        tell(node_id, text, level=logging.DEBUG)
        try:
            server = prompt_server()
            if server is not None:
                server.send_sync(WARNING_EVENT, {"node": node_id, "text": text})
        except Exception as e:  # outside a server
            logger.debug("could not show the warning in the UI: %s", e)

    return notify


def patch_model(model, spec: DetectorSpec, edit, kind: str, node_id=None, region=None, region_mode: str = "intersect",
           lookahead: LookAheadSettings | None = None):
    """Validate against the model, then clone and patch the SAE's block. Returns (model, RunState)."""
    key, name = resolve_hook(spec.sae, model)
    recorder = Recorder()
    intervention = BlockIntervention(spec.sae, spec.detector, edit, branches=spec.branches, recorder=recorder,
                                     label=name, region=region, region_mode=region_mode, lookahead=lookahead)
    state = RunState(f"{kind} {name}", recorder, key, intervention=intervention)
    state.notify = _ui_notifier(node_id)
    start, end = spec.start_percent, spec.end_percent
    check_window(start, end)

    def window_of(model_sampling):
        return sigma_window(model_sampling, start, end)

    patched = install_patch(model, key, intervention, state, comfy.patcher_extension.WrappersMP.OUTER_SAMPLE,
                            window_of)
    fill = DenoisedFill([intervention])
    if fill:  # look-ahead PER that also fills the sampler's denoised prediction (after CFG, every sampler)
        patched.set_model_sampler_post_cfg_function(_post_cfg(fill))
    managed = manage_sae_weights(patched, spec.sae)
    logger.info("%s: patched %s (%s) with %s; SAE weights %s", kind, key, getattr(spec.sae, "source", "SAE"), edit,
                "managed by ComfyUI with the model" if managed else "cast lazily per device")
    return patched, state


def _post_cfg(fill: DenoisedFill):
    """sampler_post_cfg_function: the CFG-combined denoised prediction through the fill (unchanged outside pass 2)."""
    def post_cfg(args):
        return fill(args["denoised"])

    return post_cfg
