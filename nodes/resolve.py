"""Which block of which model: the ComfyUI model's family, the SAE's block on it (family and width checked
before sampling), and SAE Steer's node inputs as settings. Nothing here imports ComfyUI."""

from __future__ import annotations

import logging
from typing import Any

try:  # inside ComfyUI the pack is a package and sae_core its sibling
    from ..sae_core.blocks import BlockError, BlockMismatchError, resolve_block
    from ..sae_core.blocks_dit import DIT_FAMILIES, family_from_comfy
    from ..sae_core.errors import SAEInputError
    from ..sae_core.steer import SteerSettings
except ImportError:  # imported as top-level `nodes` (tests, scripts) with sae_core on sys.path
    from sae_core.blocks import BlockError, BlockMismatchError, resolve_block
    from sae_core.blocks_dit import DIT_FAMILIES, family_from_comfy
    from sae_core.errors import SAEInputError
    from sae_core.steer import SteerSettings

from .dit_hook import dit_block_width  # noqa: E402 - after the sae_core imports

logger = logging.getLogger(__name__)

# supported_models class names (any class in the config's MRO) -> sae_core family
_FAMILY_OF_CONFIG = {"SD15": "sd1", "SDXL": "sdxl", "SDXLRefiner": None}


def family_of_config(model_config: Any) -> str | None:
    """sae_core family of a ComfyUI supported_models config (SD15 and subclasses -> sd1, SDXL -> sdxl, Flux ->
    flux, SD3 -> sd3 or sd35large)."""
    for cls in type(model_config).__mro__:
        if cls.__name__ in _FAMILY_OF_CONFIG:
            return _FAMILY_OF_CONFIG[cls.__name__]
    return family_from_comfy([c.__name__ for c in type(model_config).__mro__], getattr(model_config, "unet_config", None))


def resolve_hook(sae, model, block: str | None = None) -> tuple[str, str]:
    """(ComfyUI key, diffusers name) of the block to hook, after checking family and width.

    ``block`` overrides the SAE's own hook point. Raises ValueError naming the SAE file, the block, what
    was expected and what was found.
    """
    source = getattr(sae, "source", "SAE")
    cfg = sae.cfg
    config = model.model.model_config
    family = family_of_config(config)
    if family is None:
        raise SAEInputError(
            f"{source}: the model is {type(config).__name__}, expected an SD 1.x or SDXL UNet (sd1, sdxl), FLUX.1 "
            "(flux) or SD3 / SD3.5 (sd3, sd35large); SAE hooks exist only for those families"
        )
    sae_family = getattr(cfg, "model_family", None)
    if sae_family is not None and sae_family != family:
        raise SAEInputError(
            f"{source}: the SAE was trained on {sae_family} (hook point {cfg.hook_point}), but the model is "
            f"{family} ({type(config).__name__}); use an SAE trained on {family} or the {sae_family} model"
        )
    name = block or cfg.hook_point
    if not name:
        raise SAEInputError(
            f"{source}: the SAE file records no hook point; pick the block it was trained on in Load SAE (block)"
        )
    try:
        spec = resolve_block(name, family)
    except BlockError as e:
        raise type(e)(f"{source}: {e}") from None
    key = spec.comfy_key
    try:
        module = model.get_model_object(key)
    except AttributeError:
        raise SAEInputError(f"{source}: block {spec.diffusers} ({key}) does not exist in this {family} model") from None
    if spec.family in DIT_FAMILIES:
        found = dit_block_width(module)
    else:
        found = getattr(module, "in_channels", None)
    if found is None:
        raise SAEInputError(f"{source}: {key} is a {type(module).__name__}, expected a SpatialTransformer block")
    if int(found) != int(cfg.d_in):
        raise BlockMismatchError(
            f"{source}: block {spec.diffusers} ({key}) has {found} channels in this model, the SAE expects "
            f"d_in={cfg.d_in}; load the SAE trained for this block, or pick the block it was trained on"
        )
    return key, spec.diffusers


def steer_settings(method: str, strength: float, error: str, detected_only: bool, use_beta: bool = False,
                   cfg_sign: str = "same") -> SteerSettings:
    """SAE Steer's inputs as SteerSettings. The legacy error mode reproduces the published SAeUron / SAEmnesia hook,
    which moves every patch, so it ignores detected_only (the node's tooltip says so) rather than silently limiting
    the published numbers to the detected patches."""
    if error == "legacy_saeuron" and detected_only:
        logger.info("SAE Steer: error legacy_saeuron edits every patch as published; detected_only is ignored")
        detected_only = False
    return SteerSettings(method=method, strength=strength, error=error, detected_only=detected_only,
                         use_beta=use_beta, cfg_sign=cfg_sign)


def min_share_hint(min_share: float, k: int | None) -> str | None:
    """Concept Detector's note when min_share is above 1/k of a TopK SAE: a patch's code is about k latents, so a
    share above 1/k asks the concept's latents for more than an equal part of it, and objects can lose patches
    (the Shapes world's k=8 SAE stopped erasing at 0.2; 0.8/k measured best). None when there is nothing to say."""
    if not k or min_share <= 1.0 / k:
        return None
    return (f"Concept Detector: min_share {min_share:g} is above 1/k = {1.0 / k:.3g} of this SAE (k={k} latents per "
            f"patch), so the concept's latents must carry more than an equal part of a patch's code; objects can lose "
            f"patches. About 0.8/k = {0.8 / k:.2g} measured best on the Shapes world: check with Mask Preview that "
            f"the object stays covered")
