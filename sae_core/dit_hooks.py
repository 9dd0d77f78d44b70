"""Host adapter for diffusers transformers (FluxTransformer2DModel, SD3Transformer2DModel): interventions on the
image tokens of named blocks for the duration of a ``with`` block; every hook is removed in ``finally``.

In diffusers 0.42 every FLUX block (``transformer_blocks.N``, ``single_transformer_blocks.N``) and every SD3
``JointTransformerBlock`` is called as ``block(hidden_states=..., encoder_hidden_states=..., ...)`` and returns
``(encoder_hidden_states, hidden_states)``: the text stream first (None after SD3's last, context pre-only
block), the image tokens second. The single FLUX blocks split the joint sequence back before returning, so
``hidden_states`` is image tokens only in every case. The intervention sees those tokens as the
``[B, C, H, W]`` grid BlockIntervention expects; the text stream is returned as it was.

The token grid of each transformer call is read from the call itself by a pre-hook on the transformer:
SD3 gets the latent ``[B, C, H, W]`` (grid = H // p x W // p: diffusers' patch embedding drops an odd
last row, where ComfyUI pads it), FLUX gets packed tokens with
``img_ids`` whose rows are (index, row, column); the sampled image's tokens (index 0) come first, any
reference-image tokens (Kontext) after them, untouched.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from .blocks import BlockError, resolve_block
from .blocks_dit import DIT_FAMILIES, family_from_diffusers_config
from .errors import SAEInputError, SAELookupError, SAETypeError
from .intervention import BlockIntervention, StepInfo

logger = logging.getLogger(__name__)

__all__ = ["attach_dit_interventions", "dit_family", "grid_of_call"]


def dit_family(transformer: nn.Module) -> str:
    """The registry family of a diffusers transformer, from its config; SAELookupError when it is no known DiT."""
    config = dict(getattr(transformer, "config", None) or {})
    config.setdefault("_class_name", type(transformer).__name__)
    family = family_from_diffusers_config(config)
    if family not in DIT_FAMILIES:
        raise SAELookupError(
            f"{type(transformer).__name__}: not a FLUX (FluxTransformer2DModel) or SD3 (SD3Transformer2DModel) "
            "transformer; for UNets use sae_core.torch_hooks.attach_interventions"
        )
    return family


def grid_of_call(transformer: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
    """(rows, columns) of the sampled image's token grid in one transformer call (see the module docstring)."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if isinstance(x, Tensor) and x.ndim == 4:  # SD3: the latent itself, cut into p x p patches by a stride-p conv
        p = int(getattr(getattr(transformer, "config", None), "patch_size", None) or 2)
        return x.shape[-2] // p, x.shape[-1] // p  # diffusers does not pad (ComfyUI does: ceil there)
    ids = kwargs.get("img_ids")
    if ids is None and len(args) > 5:
        ids = args[5]
    if not isinstance(ids, Tensor) or ids.shape[-1] != 3:
        raise SAEInputError(
            f"{type(transformer).__name__}: cannot tell the token grid of this call (no 4-D latent and no img_ids "
            "[N, 3]); pass grid=(rows, columns) to attach_dit_interventions"
        )
    ids = ids[0] if ids.ndim == 3 else ids
    main = ids[ids[:, 0] == ids[0, 0]]
    rows = int(main[:, 1].max() - main[:, 1].min()) + 1
    cols = int(main[:, 2].max() - main[:, 2].min()) + 1
    return rows, cols


def _make_hook(name: str, ivs: Sequence[BlockIntervention], step_of: Callable[[], StepInfo], grid_of: Callable):
    def hook(module, args, kwargs, output):
        if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], Tensor)):
            raise SAETypeError(
                f"{name}: the block returned {type(output).__name__}, expected (encoder_hidden_states, hidden_states) "
                "as diffusers' FLUX and SD3 blocks do"
            )
        txt, img = output
        gh, gw = grid_of()
        n = gh * gw
        if img.ndim != 3 or img.shape[1] < n:
            raise SAEInputError(f"{name}: image tokens have shape {tuple(img.shape)}, expected [B, >= {n}, C] for a "
                                f"{gh}x{gw} token grid")
        block_out = rearrange(img[:, :n], "b (h w) c -> b c h w", h=gh, w=gw)
        x_in = kwargs.get("hidden_states", args[0] if args else None)
        block_in = None
        if isinstance(x_in, Tensor) and x_in.shape == img.shape:
            block_in = rearrange(x_in[:, :n], "b (h w) c -> b c h w", h=gh, w=gw)
        step = step_of()
        y = block_out
        for iv in ivs:
            y = iv(block_in, y, step)
        if y is block_out:
            return output
        tokens = rearrange(y, "b c h w -> b (h w) c").to(img.dtype)
        new = tokens.contiguous() if n == img.shape[1] else torch.cat([tokens, img[:, n:]], dim=1)
        return (txt, new)

    return hook


@contextmanager
def attach_dit_interventions(
    transformer: nn.Module,
    interventions: Mapping[str, BlockIntervention | Sequence[BlockIntervention]],
    step: Callable[[], StepInfo],
    grid: tuple[int, int] | None = None,
) -> Iterator[list]:
    """Attach ``interventions`` ({block name: intervention or list, applied in order}) to the image tokens of a
    diffusers FLUX / SD3 transformer's blocks.

    Block names are any spelling of the registry (``transformer_blocks.3``, ``single_transformer_blocks.9``,
    ``double_blocks.3``, ``single.9``, hook names with a ``transformer.`` prefix), resolved in the transformer's
    family. ``step`` returns the current StepInfo (torch_hooks.StepHolder / track_timestep work: diffusers passes
    FLUX's timestep as sigma in 0..1 and SD3's as sigma * 1000, the same values ComfyUI's model_sampling gives).
    ``grid`` fixes the token grid; by default it is read from every transformer call. Entering resets the
    interventions' per-run memory.
    """
    family = dit_family(transformer)
    modules = dict(transformer.named_modules())
    resolved: dict[str, list] = {}
    for name, ivs in interventions.items():
        try:
            spec = resolve_block(name, family)
        except BlockError as e:
            raise type(e)(f"attach_dit_interventions: {e}") from None
        if spec.diffusers not in modules:
            raise SAELookupError(
                f"attach_dit_interventions: {type(transformer).__name__} has no block {spec.diffusers} ({name!r}); it "
                f"has {sum(1 for n in modules if n.count('.') == 1 and 'transformer_blocks' in n)} blocks"
            )
        resolved.setdefault(spec.diffusers, []).extend(list(ivs) if isinstance(ivs, (list, tuple)) else [ivs])
    current: dict[str, tuple[int, int] | None] = {"grid": tuple(grid) if grid is not None else None}

    def pre(module, args, kwargs):
        if grid is None:
            current["grid"] = grid_of_call(module, args, kwargs)

    def grid_of():
        if current["grid"] is None:
            raise SAEInputError("attach_dit_interventions: a block ran before the transformer's forward gave a grid; "
                                "call the transformer itself, or pass grid=(rows, columns)")
        return current["grid"]

    handles = []
    try:
        handles.append(transformer.register_forward_pre_hook(pre, with_kwargs=True))
        for name, seq in resolved.items():
            for iv in seq:
                if hasattr(iv, "reset"):
                    iv.reset()
            handles.append(modules[name].register_forward_hook(_make_hook(name, seq, step, grid_of), with_kwargs=True))
        logger.debug("attached DiT interventions to %s", list(resolved))
        yield handles
    finally:
        for h in handles:
            h.remove()
