"""Hook-point registry: diffusers names <-> ComfyUI module paths, channels and grid stride per UNet family.

Every hookable block is a SpatialTransformer (diffusers ``Transformer2DModel``). Its canonical name is
the diffusers module path inside the UNet (``up_blocks.1.attentions.1``); ComfyUI reaches the same
module as ``diffusion_model.output_blocks.4.1``. The tables are derived from the general rule of the
LDM UNet (two res blocks per level, so three entries per input level and three per output level):

    down_blocks.X.attentions.I -> input_blocks.{1 + 3X + I}.1
    up_blocks.X.attentions.I   -> output_blocks.{3X + I}.1
    mid_block.attentions.0     -> middle_block.1

plus, per family, which levels carry attention and their channel widths. A block at level L sees a
grid of ``ceil(latent / 2**L)`` positions per side (the UNet's stride-2 convolutions round up).

Names accepted by :func:`resolve_block` (``X``, ``I``, ``N`` are integers):

- diffusers: ``down_blocks.X.attentions.I``, ``mid_block.attentions.0``, ``up_blocks.X.attentions.I``
- ComfyUI: ``input_blocks.N.1``, ``middle_block.1``, ``output_blocks.N.1``
- short names (sdxl-unbox, SAeUron scripts): ``down.X.I``, ``mid.0``, ``up.X.I``
- any of these after a dotted or slashed prefix (``unet.``, ``model.diffusion_model.``,
  ``pipe.unet.``, ``checkpoints/``), as in sparsify/SAeUron/SAELens hook names, and followed by
  ``_...`` or ``/...`` (sdxl-unbox folder names such as
  ``unet.up_blocks.0.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001``).

A name that continues into the block with ``.`` (``...attentions.1.transformer_blocks.0``,
``...attentions.1.proj_out``) is rejected: those modules sit inside the SpatialTransformer, before
``proj_out`` and the residual add, so an SAE trained there sees a different activation than the block
output this pack hooks.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

from .blocks_dit import DIT_FAMILIES, DIT_LAYOUTS, DIT_NAME_RE, dit_rows, family_from_diffusers_config
from .errors import (
    AmbiguousBlockError,
    BlockError,
    BlockMismatchError,
    SAEInputError,
    UnknownBlockError,
    UnknownFamilyError,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "AmbiguousBlockError",
    "BlockError",
    "BlockMismatchError",
    "BlockSpec",
    "Grid",
    "UnknownBlockError",
    "UnknownFamilyError",
    "blocks",
    "canonical_name",
    "check_sae_fits",
    "comfy_key",
    "family_from_diffusers",
    "grid_size",
    "normalize_family",
    "resolve_block",
]

COMFY_PREFIX = "diffusion_model."


class BlockSpec(NamedTuple):
    """One hookable SpatialTransformer of one UNet family."""

    family: str
    """Model family: "sd1" (SD 1.x), "sdxl" (SDXL, SDXL-Turbo), or a DiT family (see blocks_dit)."""
    diffusers: str
    """Canonical diffusers module path inside the UNet, e.g. "up_blocks.1.attentions.1"."""
    comfy: str
    """ComfyUI module path inside the diffusion model, e.g. "output_blocks.4.1"."""
    short: str
    """Short name used by sdxl-unbox and SAeUron scripts, e.g. "up.1.1"."""
    channels: int
    """Channel width of the block's input and output (the SAE's d_in)."""
    level: int
    """Resolution level: 0 is the latent resolution, each level halves it (DiT blocks: 1, the 2x2 patch grid)."""

    @property
    def stride(self) -> int:
        """Latent downsampling factor of the block's feature map (2 ** level)."""
        return 2**self.level

    @property
    def comfy_key(self) -> str:
        """ComfyUI object-patch key, e.g. "diffusion_model.output_blocks.4.1"."""
        return COMFY_PREFIX + self.comfy

    def describe(self) -> str:
        return f"{self.diffusers} (ComfyUI {self.comfy}, {self.family}, {self.channels} ch, 1/{self.stride})"


class Grid(NamedTuple):
    """Spatial size of a block's feature map, in patches."""

    height: int
    width: int


@dataclass(frozen=True)
class _FamilyLayout:
    """What distinguishes the families: channels per level and which levels carry attention."""

    channels: tuple[int, ...]  # per level, level 0 first; the deepest level hosts the middle block
    attention_levels: tuple[int, ...]
    aliases: tuple[str, ...]


_LAYOUTS: dict[str, _FamilyLayout] = {
    # SD 1.x: four levels, attention on the first three; the 4th level (1280, 1/8) has only res blocks
    # and the middle block.
    "sd1": _FamilyLayout((320, 640, 1280, 1280), (0, 1, 2), ("sd1", "sd14", "sd15", "sd1x")),
    # SDXL / SDXL-Turbo: three levels, no attention at level 0; the middle block sits at level 2.
    "sdxl": _FamilyLayout((320, 640, 1280), (1, 2), ("sdxl", "sdxlturbo", "sdxlbase")),
}

FAMILIES: tuple[str, ...] = tuple(_LAYOUTS) + DIT_FAMILIES
_ALIASES: dict[str, tuple[str, ...]] = {
    **{f: lay.aliases for f, lay in _LAYOUTS.items()}, **{f: lay.aliases for f, lay in DIT_LAYOUTS.items()}
}

_RES_PER_LEVEL = 2  # res blocks per level in down_blocks; up_blocks have one more


def _build(family: str) -> tuple[BlockSpec, ...]:
    layout = _LAYOUTS[family]
    n_levels = len(layout.channels)
    specs = []
    for x in range(n_levels):
        if x in layout.attention_levels:
            for i in range(_RES_PER_LEVEL):
                specs.append(
                    BlockSpec(
                        family,
                        f"down_blocks.{x}.attentions.{i}",
                        f"input_blocks.{1 + 3 * x + i}.1",
                        f"down.{x}.{i}",
                        layout.channels[x],
                        x,
                    )
                )
    deepest = n_levels - 1
    specs.append(
        BlockSpec(
            family, "mid_block.attentions.0", "middle_block.1", "mid.0", layout.channels[deepest], deepest
        )
    )
    for x in range(n_levels):
        level = deepest - x  # up_blocks run from the deepest level back to the latent resolution
        if level in layout.attention_levels:
            for i in range(_RES_PER_LEVEL + 1):
                specs.append(
                    BlockSpec(
                        family,
                        f"up_blocks.{x}.attentions.{i}",
                        f"output_blocks.{3 * x + i}.1",
                        f"up.{x}.{i}",
                        layout.channels[level],
                        level,
                    )
                )
    return tuple(specs)


_BLOCKS: dict[str, tuple[BlockSpec, ...]] = {
    **{f: _build(f) for f in _LAYOUTS},
    **{f: tuple(BlockSpec(f, *row) for row in dit_rows(f)) for f in DIT_FAMILIES},  # DiTs: blocks_dit
}
# name (diffusers, ComfyUI or short) -> spec, per family
_INDEX: dict[str, dict[str, BlockSpec]] = {
    f: {n: s for s in specs for n in (s.diffusers, s.comfy, s.short)} for f, specs in _BLOCKS.items()
}

_NAME_RE = re.compile(
    r"(?:^|(?<=[./]))"
    r"(?P<name>"
    r"(?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+"
    r"|(?:input|output)_blocks\.\d+\.\d+|middle_block\.\d+"
    r"|(?:down|up)\.\d+\.\d+|mid\.\d+"
    r")"
    r"(?P<rest>(?:[._/].*)?)$"
)


def normalize_family(family: str | None) -> str | None:
    """Canonical family name ("sd1", "sdxl") from a spelling such as "SD1.5", "sdxl-turbo"; None stays None."""
    if family is None:
        return None
    key = re.sub(r"[\s._-]", "", str(family).lower())
    for name, aliases in _ALIASES.items():
        if key in aliases:
            return name
    raise UnknownFamilyError(
        f"unknown model family {family!r}: expected one of {', '.join(FAMILIES)} "
        "(sd1 = Stable Diffusion 1.x, sdxl = SDXL and SDXL-Turbo, "
        + ", ".join(f"{f} = {lay.description}" for f, lay in DIT_LAYOUTS.items())
        + ")"
    )


def family_from_diffusers(config: Mapping[str, Any]) -> str | None:
    """Model family of a diffusers denoiser config (``unet.config`` / ``transformer.config`` or its config.json),
    or None when the pack has no block table for it.

    UNet2DConditionModel: SD 1.x has block_out_channels (320, 640, 1280, 1280) and 768-wide text; SDXL (and
    SDXL-Turbo) (320, 640, 1280) and 2048-wide text. Transformers: see blocks_dit.family_from_diffusers_config."""
    dit = family_from_diffusers_config(config)
    if dit is not None:
        return dit
    if str(config.get("_class_name", "UNet2DConditionModel")) != "UNet2DConditionModel":
        return None
    channels = tuple(int(c) for c in config.get("block_out_channels", ()) or ())
    ctx = config.get("cross_attention_dim")
    ctx = int(ctx[0] if isinstance(ctx, (list, tuple)) else ctx) if ctx is not None else None
    if channels == _LAYOUTS["sd1"].channels and ctx == 768:
        return "sd1"
    if channels == _LAYOUTS["sdxl"].channels and ctx == 2048:
        return "sdxl"
    return None


def blocks(family: str) -> tuple[BlockSpec, ...]:
    """All hookable blocks of a family, down, mid, up, in UNet order."""
    fam = normalize_family(family)
    if fam is None:
        raise UnknownFamilyError(f"blocks(): a model family is needed, one of {', '.join(FAMILIES)}")
    return _BLOCKS[fam]


def _known_names(family: str) -> str:
    return ", ".join(f"{s.diffusers} ({s.comfy}, {s.short})" for s in _BLOCKS[family])


def _bare_name(name: str) -> str:
    """The registry name embedded in a hook name, with prefixes and folder suffixes removed."""
    m = _NAME_RE.search(name.strip())
    if m is None:
        m = DIT_NAME_RE.search(name.strip())
        if m is not None and m.group("rest").startswith("."):
            raise UnknownBlockError(
                f"hook point {name!r} names a sub-module ({m.group('rest')[1:]!r}) inside the transformer block "
                f"{m.group('name')!r}; this pack hooks the block's output image stream (the hidden states the "
                f"block returns). Use an SAE trained on the whole block ({m.group('name')!r})."
            )
    if m is None:
        raise UnknownBlockError(
            f"unknown block {name!r}: no diffusers (up_blocks.X.attentions.I, transformer_blocks.N, "
            "single_transformer_blocks.N), ComfyUI (output_blocks.N.1, double_blocks.N, single_blocks.N, "
            "joint_blocks.N) or short (up.X.I, double.N, single.N, joint.N) block name in it. Known blocks: "
            + "; ".join(f"{f}: {_known_names(f)}" for f in FAMILIES)
        )
    rest = m.group("rest")
    if rest.startswith("."):
        raise UnknownBlockError(
            f"hook point {name!r} names a sub-module ({rest[1:]!r}) inside the SpatialTransformer "
            f"{m.group('name')!r}; that activation lies before proj_out and the residual add, so it is "
            "not the block output this pack hooks. Use an SAE trained on the whole block "
            f"({m.group('name')!r}), or the block output if your SAE really was trained there."
        )
    return m.group("name")


def resolve_block(
    name: str | BlockSpec, family: str | None = None, *, channels: int | None = None
) -> BlockSpec:
    """The BlockSpec a name refers to.

    ``family`` picks the UNet family; when it is None the family is inferred if the name exists in
    only one family (or only one family's block has ``channels`` channels, when given), otherwise an
    AmbiguousBlockError lists the candidates. Accepted spellings: see the module docstring.
    """
    fam = normalize_family(family)
    if isinstance(name, BlockSpec):
        if fam is not None and name.family != fam:
            raise UnknownBlockError(
                f"block {name.describe()} belongs to {name.family}, but family {fam} was asked for; "
                f"resolve the block name in {fam} instead (its channels may differ)"
            )
        return name
    if not isinstance(name, str):
        raise UnknownBlockError(f"block name must be a string, got {type(name).__name__}: {name!r}")
    bare = _bare_name(name)
    if fam is not None:
        spec = _INDEX[fam].get(bare)
        if spec is None:
            elsewhere = [f for f in FAMILIES if f != fam and bare in _INDEX[f]]
            hint = (
                f" It is a block of {', '.join(elsewhere)}: the SAE was probably trained on another model."
                if elsewhere
                else ""
            )
            raise UnknownBlockError(
                f"{name!r} is not a hookable block of {fam}.{hint} Known {fam} blocks: {_known_names(fam)}"
            )
        return spec
    candidates = [_INDEX[f][bare] for f in FAMILIES if bare in _INDEX[f]]
    if channels is not None and len(candidates) > 1:
        fitting = [s for s in candidates if s.channels == channels]
        candidates = fitting or candidates
    if not candidates:
        raise UnknownBlockError(
            f"{name!r} is not a hookable block of any known family. Known blocks: "
            + "; ".join(f"{f}: {_known_names(f)}" for f in FAMILIES)
        )
    if len(candidates) > 1:
        raise AmbiguousBlockError(
            f"{name!r} exists in several model families; pass the family. Candidates: "
            + "; ".join(s.describe() for s in candidates)
        )
    return candidates[0]


def canonical_name(name: str | BlockSpec) -> str:
    """The diffusers name of a block, without choosing a family.

    The index rule is the same in every family, so ``output_blocks.4.1`` is ``up_blocks.1.attentions.1``
    in SD1 and in SDXL alike (with different channels); this works where resolve_block would be ambiguous.
    """
    if isinstance(name, BlockSpec):
        return name.diffusers
    if not isinstance(name, str):
        return resolve_block(name).diffusers  # raises the type error
    bare = _bare_name(name)
    found = {_INDEX[f][bare].diffusers for f in FAMILIES if bare in _INDEX[f]}
    if not found:
        return resolve_block(name).diffusers  # raises the unknown-block message with the known names
    (diffusers,) = found  # the index rule is family-independent, so there is exactly one
    return diffusers


def comfy_key(spec: BlockSpec | str, family: str | None = None) -> str:
    """ComfyUI object-patch key of a block, e.g. "diffusion_model.output_blocks.4.1"."""
    return resolve_block(spec, family).comfy_key


def grid_size(block: BlockSpec | str, latent_h: int, latent_w: int, family: str | None = None) -> Grid:
    """Feature-map size (height, width) of a block for a latent of latent_h x latent_w.

    The latent is image size / 8 for SD and SDXL; each level halves it, rounding up like the UNet's
    stride-2 convolutions do, so non-square and odd sizes are exact.
    """
    spec = resolve_block(block, family)
    for label, v in (("latent_h", latent_h), ("latent_w", latent_w)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SAEInputError(f"grid_size: {label} must be a positive int (latent size), got {v!r}")
    return Grid(math.ceil(latent_h / spec.stride), math.ceil(latent_w / spec.stride))


def _with_channels(family: str, channels: int) -> str:
    return ", ".join(f"{s.diffusers} ({s.comfy})" for s in _BLOCKS[family] if s.channels == channels)


def check_sae_fits(
    d_in: int, block: BlockSpec | str, family: str | None = None, *, source: str = "SAE"
) -> BlockSpec:
    """Return the block's spec if an SAE of input width d_in fits it, else raise BlockMismatchError.

    ``source`` names the SAE file in the message. The message lists the blocks of the same family that
    have d_in channels (where the SAE was probably trained), or the families that have such blocks.
    """
    try:
        spec = resolve_block(block, family, channels=d_in)
    except AmbiguousBlockError as e:
        cands = [_INDEX[f][_bare_name(block)] for f in FAMILIES if _bare_name(block) in _INDEX[f]]
        if any(c.channels == d_in for c in cands):  # several families fit: the caller must choose
            raise AmbiguousBlockError(f"{source}: {e}") from None
        # resolve_block keeps every candidate when none has d_in channels: a mismatch in all families
        raise BlockMismatchError(
            f"{source}: SAE input width d_in={d_in} does not fit block {cands[0].diffusers} in any model family ("
            + ", ".join(f"{c.family}: ComfyUI {c.comfy_key}, {c.channels} channels" for c in cands)
            + "). "
            + (
                "Pick the block this SAE was trained on: "
                + "; ".join(
                    f"{f} blocks with {d_in} channels: {_with_channels(f, d_in) or 'none'}" for f in FAMILIES
                )
                + "."
                if any(_with_channels(f, d_in) for f in FAMILIES)
                else f"No known block has {d_in} channels: this SAE was trained on another model."
            )
        ) from None
    except BlockError as e:
        raise type(e)(f"{source}: {e}") from None
    if d_in == spec.channels:
        return spec
    same = _with_channels(spec.family, d_in)
    if same:
        what_to_do = (
            f"Pick the block this SAE was trained on: {spec.family} blocks with {d_in} channels are {same}."
        )
    else:
        other = sorted({s.family for f in FAMILIES for s in _BLOCKS[f] if s.channels == d_in})
        where = f" ({', '.join(other)} has such blocks)" if other else ""
        what_to_do = (
            f"No {spec.family} block has {d_in} channels{where}: this SAE was trained on another model; "
            f"use it with that model, or load an SAE trained on {spec.family}."
        )
    raise BlockMismatchError(
        f"{source}: SAE input width d_in={d_in} does not fit block {spec.diffusers} "
        f"(ComfyUI {spec.comfy_key}, {spec.family}), which has {spec.channels} channels. {what_to_do}"
    )
