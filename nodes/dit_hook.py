"""The DiT hook: a ``patches_replace["dit"]`` patch on one FLUX / MMDiT block that edits its image tokens only.

ComfyUI's FLUX (``comfy/ldm/flux/model.py``) and MMDiT (``comfy/ldm/modules/diffusionmodules/mmdit.py``) call
``patches_replace["dit"][("double_block", i)]`` / ``[("single_block", i)]`` with an args dict (``img``,
``txt``, ``vec``, ``pe``, ``attn_mask``, ``transformer_options``) and ``{"original_block": fn}``, and take
``{"img", "txt"}`` (double / joint blocks) or ``{"img"}`` (single blocks) back. In a FLUX single block
``img`` is the joint sequence: the text tokens first, then the image tokens, then any reference-image
tokens (Kontext). Only the image tokens of the sampled latent are shown to the intervention, as the
``[B, C, H, W]`` map BlockIntervention expects (a view, no copy); every other token is returned as it was.

The token grid comes from the call itself: an APPLY_MODEL wrapper reads the latent ``x`` of each model
call (any aspect ratio; area conditioning crops it per call) and the text length, and hands them to the
block patch through the call's transformer_options. Newer ComfyUI also puts ``img_slice`` = [text
length, sequence length] in the single blocks' transformer_options; it is preferred where present.

Like nodes/hook.py this imports nothing of ComfyUI.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from typing import Callable

import torch
from einops import rearrange

try:  # inside ComfyUI the pack is a package and sae_core its sibling
    from ..sae_core.blocks_dit import dit_patch_key
    from ..sae_core.errors import SAEInputError
except ImportError:  # imported as top-level `nodes` (tests, scripts)
    from sae_core.blocks_dit import dit_patch_key
    from sae_core.errors import SAEInputError

from .run_state import OPTIONS_KEY, WRAPPER_PREFIX, make_outer_sample_wrapper  # noqa: E402

logger = logging.getLogger(__name__)

APPLY_MODEL = "apply_model"  # comfy.patcher_extension.WrappersMP.APPLY_MODEL
GRID_WRAPPER_KEY = "sae_concept_eraser.dit_grid"  # one wrapper per model, whatever the number of DiT patches
GRID_KEY = "sae_concept_eraser.dit_grid"  # transformer_options key: (latent_h, latent_w, text tokens or None)
_DIT_KEY_RE = re.compile(r"^diffusion_model\.(?:double_blocks|single_blocks|joint_blocks)\.\d+$")


def is_dit_key(key: str) -> bool:
    """True for the ComfyUI key of a FLUX / MMDiT block (``diffusion_model.double_blocks.3``)."""
    return bool(_DIT_KEY_RE.match(key))


def dit_block_width(module) -> int | None:
    """Hidden width of a ComfyUI DiT block (FLUX DoubleStreamBlock / SingleStreamBlock, MMDiT JointBlock)."""
    for attr in ("hidden_size", "hidden_dim"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    x_block = getattr(module, "x_block", None)  # MMDiT: the image half of the joint block
    qkv = getattr(getattr(x_block, "attn", None), "qkv", None)
    return getattr(qkv, "in_features", None)


# ------------------------------------------------------------------------------------------------
# the grid of each model call


def _call_arg(args: tuple, kwargs: dict, index: int, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def latent_grid_wrapper(executor, *args, **kwargs):
    """APPLY_MODEL wrapper: ``apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kw)``.
    Passes on a copy of transformer_options that records x's spatial size and the text length."""
    x = _call_arg(args, kwargs, 0, "x")
    to = _call_arg(args, kwargs, 5, "transformer_options")
    if not isinstance(to, dict) or not isinstance(x, torch.Tensor) or x.ndim < 4:
        return executor(*args, **kwargs)
    context = _call_arg(args, kwargs, 3, "c_crossattn")
    txt = int(context.shape[1]) if isinstance(context, torch.Tensor) and context.ndim == 3 else None
    to = {**to, GRID_KEY: (int(x.shape[-2]), int(x.shape[-1]), txt)}
    if "transformer_options" in kwargs or len(args) <= 5:
        kwargs["transformer_options"] = to
    else:
        args = (*args[:5], to, *args[6:])
    return executor(*args, **kwargs)


def image_span(kind: str, seq: torch.Tensor, to: dict, patch_size: int, label: str) -> tuple[int, int, int]:
    """(first token, grid height, grid width) of the sampled latent's image tokens in a block's ``img`` sequence.

    Double / joint blocks: the image stream starts with them. Single blocks: they follow the text tokens."""
    info = to.get(GRID_KEY)
    if info is None:
        raise SAEInputError(
            f"{label}: the model call carries no latent size (our APPLY_MODEL wrapper did not run). The DiT block was "
            "called outside ComfyUI's sampler, or another node replaced apply_model without running its wrappers; "
            "sample with a KSampler / SamplerCustom node"
        )
    lh, lw, txt = info
    gh, gw = math.ceil(lh / patch_size), math.ceil(lw / patch_size)
    start = 0
    if kind == "single_block":
        sl = to.get("img_slice")  # newer ComfyUI: [text tokens, sequence length]
        if isinstance(sl, (list, tuple)) and sl and isinstance(sl[0], int):
            txt = sl[0]
        if txt is None:
            raise SAEInputError(f"{label}: the model call has no text conditioning, so the text tokens that come "
                                "first in a single block's sequence cannot be told from the image tokens")
        start = int(txt)
    if seq.ndim != 3 or seq.shape[1] < start + gh * gw:
        raise SAEInputError(
            f"{label}: the block's token sequence has shape {tuple(seq.shape)}, expected [B, >= {start + gh * gw}, C] "
            f"({start} text tokens, then a {gh}x{gw} grid of image tokens for a {lh}x{lw} latent with "
            f"{patch_size}x{patch_size} patches). This model packs its tokens differently from FLUX / SD3"
        )
    return start, gh, gw


# ------------------------------------------------------------------------------------------------
# the patch


def make_dit_patch(kind: str, prev: Callable | None, intervention, state, window_of: Callable | None,
                   patch_size: int):
    """A ``patches_replace["dit"]`` function: run ``prev`` (an earlier replace patch) or the original block, then
    the intervention on the image tokens of its ``img`` output. Identity outside a run of this patch's sampler."""

    def patch(args: dict, extra: dict):
        def block():
            return prev(args, extra) if prev is not None else extra["original_block"](args)

        if not state.active:
            return block()
        to = args.get("transformer_options") or extra.get("transformer_options") or {}
        x_in = args.get("img")
        step = state.step_in_window(to, window_of, x_in.device if isinstance(x_in, torch.Tensor) else "cpu")
        if step is None:
            return block()
        saved_in = None
        if getattr(intervention, "needs_block_in", True) and isinstance(x_in, torch.Tensor):
            # ComfyUI's FLUX single block adds its update to its input in place (x += ...): keep the image tokens
            # of the input now, or a residual SAE would see output - output = 0
            s0, h0, w0 = image_span(kind, x_in, to, patch_size, state.label)
            saved_in = x_in[:, s0:s0 + h0 * w0].clone()
        out = block()
        img = out["img"]
        start, gh, gw = image_span(kind, img, to, patch_size, state.label)
        n = gh * gw
        block_out = rearrange(img[:, start:start + n], "b (h w) c -> b c h w", h=gh, w=gw)
        block_in = None
        if saved_in is not None and saved_in.shape == (img.shape[0], n, img.shape[2]):
            block_in = rearrange(saved_in, "b (h w) c -> b c h w", h=gh, w=gw)
        new = intervention(block_in, block_out, step)
        if new is block_out:
            return out
        tokens = rearrange(new, "b c h w -> b (h w) c").to(img.dtype)
        if start == 0 and n == img.shape[1]:
            full = tokens.contiguous()
        else:  # text tokens before, reference-image tokens after: exactly as the block returned them
            full = torch.cat([img[:, :start], tokens, img[:, start + n:]], dim=1)
        return {**out, "img": full}

    patch.sae_state = state
    patch.sae_prev = prev
    return patch


def install_dit_patch(model, key: str, intervention, state, wrapper_type: str, window_of: Callable | None = None):
    """Clone ``model`` and put our replace patch on the DiT block ``key`` (chaining the one already there).
    Returns the clone."""

    m = model.clone()
    if state.key is None:
        state.key = key
    kind, index = dit_patch_key(key.removeprefix("diffusion_model."))
    to = m.model_options.setdefault("transformer_options", {})
    prev = to.get("patches_replace", {}).get("dit", {}).get((kind, index))
    dm = m.get_model_object("diffusion_model")
    patch_size = int(getattr(dm, "patch_size", 2) or 2)
    m.set_model_patch_replace(make_dit_patch(kind, prev, intervention, state, window_of, patch_size), "dit", kind, index)
    if not m.get_wrappers(APPLY_MODEL, GRID_WRAPPER_KEY):
        m.add_wrapper_with_key(APPLY_MODEL, GRID_WRAPPER_KEY, latent_grid_wrapper)
    patch_id = WRAPPER_PREFIX + uuid.uuid4().hex[:12]
    m.add_wrapper_with_key(wrapper_type, patch_id, make_outer_sample_wrapper(state))
    m.model_options.setdefault("transformer_options", {}).setdefault(OPTIONS_KEY, {})[patch_id] = state
    if prev is not None:
        logger.info("%s: chained the replace patch already on %s %d", state.label, kind, index)
    return m
