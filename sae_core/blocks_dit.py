"""Hook-point tables of the diffusion transformers (FLUX, SD3 / SD3.5): names, widths, token grid, families.

A DiT block's hookable activation is its **image stream**: the image tokens of the block's output, one
row of ``channels`` values per latent patch. The text tokens of a joint sequence are never hooked.

- FLUX.1 dev / schnell (and Kontext): 19 double-stream blocks (diffusers ``transformer_blocks.N`` =
  ComfyUI ``double_blocks.N``; the image stream is the block's ``img`` output) and 38 single-stream
  blocks (``single_transformer_blocks.N`` = ``single_blocks.N``; their sequence is the text tokens
  followed by the image tokens, the image tokens are hooked). 3072 channels.
- SD3 Medium / SD3.5 Medium ("sd3", 24 joint blocks, 1536 channels) and SD3.5 Large / Large Turbo
  ("sd35large", 38 joint blocks, 2432 channels): diffusers ``transformer_blocks.N`` = ComfyUI
  ``joint_blocks.N``, the image stream (``hidden_states`` / ``x``).

Both models cut the latent into 2x2 patches (padding an odd side), so the token grid is
``ceil(latent_h / 2) x ceil(latent_w / 2)``: the BlockSpec's ``level`` is 1 (stride 2) for every block.

This module holds plain data and family inference; :mod:`sae_core.blocks` builds the BlockSpecs and
resolves names. It imports nothing of the pack, so the config can list the families too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

__all__ = [
    "DIT_FAMILIES",
    "DIT_LAYOUTS",
    "DIT_NAME_RE",
    "DitLayout",
    "dit_patch_key",
    "dit_rows",
    "family_from_comfy",
    "family_from_diffusers_config",
]


@dataclass(frozen=True)
class DitLayout:
    """One DiT family: block counts per kind, width, the spellings users write for it."""

    channels: int
    double: int  # double-stream (FLUX) or joint (MMDiT) blocks
    single: int  # single-stream blocks (FLUX only)
    comfy_double: str  # ComfyUI ModuleList of the double/joint blocks
    short_double: str  # short name prefix
    aliases: tuple[str, ...]
    description: str


DIT_LAYOUTS: dict[str, DitLayout] = {
    "flux": DitLayout(3072, 19, 38, "double_blocks", "double",
                      ("flux", "flux1", "fluxdev", "flux1dev", "fluxschnell", "flux1schnell", "fluxkontext"),
                      "FLUX.1 dev / schnell / Kontext"),
    "sd3": DitLayout(1536, 24, 0, "joint_blocks", "joint",
                     ("sd3", "sd3medium", "sd35medium", "sd35m", "sd3m"),
                     "SD3 Medium, SD3.5 Medium"),
    "sd35large": DitLayout(2432, 38, 0, "joint_blocks", "joint",
                           ("sd35large", "sd35l", "sd35largeturbo", "sd35turbo", "sd3large"),
                           "SD3.5 Large, SD3.5 Large Turbo"),
}
DIT_FAMILIES: tuple[str, ...] = tuple(DIT_LAYOUTS)
DIT_LEVEL = 1  # 2x2 patchify: token grid = latent / 2, rounded up

# the block part of a hook name; the lookbehind keeps "transformer_blocks" inside "single_transformer_blocks"
# from matching, and the UNet's own "attentions.I.transformer_blocks.J" is caught by the UNet pattern first
DIT_NAME_RE = re.compile(
    r"(?:^|(?<=[./]))"
    r"(?P<name>"
    r"(?:single_transformer_blocks|transformer_blocks|double_blocks|single_blocks|joint_blocks)\.\d+"
    r"|(?:double|single|joint)\.\d+"
    r")"
    r"(?P<rest>(?:[._/].*)?)$"
)


def dit_rows(family: str) -> Iterator[tuple[str, str, str, int, int]]:
    """(diffusers, ComfyUI, short, channels, level) of every hookable block of a DiT family, in model order."""
    lay = DIT_LAYOUTS[family]
    for i in range(lay.double):
        yield f"transformer_blocks.{i}", f"{lay.comfy_double}.{i}", f"{lay.short_double}.{i}", lay.channels, DIT_LEVEL
    for i in range(lay.single):
        yield f"single_transformer_blocks.{i}", f"single_blocks.{i}", f"single.{i}", lay.channels, DIT_LEVEL


def dit_patch_key(comfy_name: str) -> tuple[str, int]:
    """ComfyUI's ``patches_replace["dit"]`` key of a block: ("double_block", i) for FLUX double and MMDiT joint
    blocks, ("single_block", i) for FLUX single blocks."""
    kind, _, idx = comfy_name.rpartition(".")
    if kind in ("double_blocks", "joint_blocks"):
        return ("double_block", int(idx))
    if kind == "single_blocks":
        return ("single_block", int(idx))
    raise ValueError(f"{comfy_name!r} is not a DiT block (double_blocks.N, single_blocks.N or joint_blocks.N)")


def _sd3_family(depth: Any) -> str:
    return "sd35large" if depth is not None and int(depth) == DIT_LAYOUTS["sd35large"].double else "sd3"


def family_from_comfy(class_names: list[str], unet_config: Mapping[str, Any] | None) -> str | None:
    """DiT family of a ComfyUI supported_models config from its class names (MRO, most derived first) and its
    unet_config; None when it is no DiT this pack knows. The width is checked later against the block itself
    (a FLUX-like model of another width gets a clear mismatch there)."""
    cfg = unet_config or {}
    for name in class_names:
        if name in ("Flux", "FluxSchnell", "FluxInpaint"):
            return "flux"
        if name == "SD3":
            return _sd3_family(cfg.get("depth"))
    return None


def family_from_diffusers_config(config: Mapping[str, Any]) -> str | None:
    """DiT family of a diffusers transformer config (``transformer.config`` or its config.json), or None.

    FluxTransformer2DModel has ``num_single_layers``; SD3Transformer2DModel has ``caption_projection_dim``
    and 24 (Medium) or 38 (Large) ``num_layers``."""
    cls = str(config.get("_class_name", ""))
    if cls == "FluxTransformer2DModel" or ("num_single_layers" in config and cls in ("", "FluxTransformer2DModel")):
        return "flux"
    if cls == "SD3Transformer2DModel" or "caption_projection_dim" in config:
        return _sd3_family(config.get("num_layers"))
    return None
