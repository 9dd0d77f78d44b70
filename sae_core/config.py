"""SAEConfig: what an SAE computes and where it belongs, validated and round-tripped through a dict."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .blocks_dit import DIT_FAMILIES
from .errors import SAEConfigError
from .mixins import DictRoundTrip

#: activation -> whether it keeps the top k of the pre-activations
ACTIVATIONS = {
    "relu_topk": True,  # sparsify / SAeUron / SAEmnesia: ReLU first, then TopK
    "topk_relu": True,  # sdxl-unbox / OpenAI / SAELens topk: TopK of raw values, then ReLU
    "sigmoid_topk": True,  # G-SAE: TopK of raw values, then Sigmoid (kept negatives become positive)
    "groupmax": True,  # sparsify: M split into k contiguous groups, max of ReLU per group
    "relu": False,  # SAELens standard
    "jumprelu": False,  # SAELens jumprelu: ReLU(pre) * (pre > threshold)
}
INPUT_SPACES = ("output", "residual")
MODEL_FAMILIES = ("sd1", "sdxl") + DIT_FAMILIES  # DiT families: blocks_dit
NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale")


@dataclass
class SAEConfig(DictRoundTrip):
    """Everything needed to run an SAE's forward exactly, plus where it was trained."""

    _unknown_key_error = SAEConfigError

    d_in: int
    """Input width: the hooked block's channel count."""
    n_latents: int
    """Number of latents M (dictionary size)."""
    k: int | None = None
    """Latents kept per patch for TopK-style activations; None for relu / jumprelu."""
    activation: str = "relu_topk"
    """One of ACTIVATIONS; the order of ReLU and TopK matters only for index lists, Sigmoid matters always."""
    input_space: str = "output"
    """'output': the SAE reads the block output; 'residual': it reads output - input (sdxl-unbox)."""
    hook_point: str | None = None
    """Canonical diffusers module name, e.g. 'up_blocks.1.attentions.1', when known."""
    model_family: str | None = None
    """'sd1' or 'sdxl' (SDXL-Turbo included) when known."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (all diffusion SAEs do; SAELens makes it optional)."""
    normalization: str = "none"
    """Per-token input normalisation undone after decode: none, layer_norm (OpenAI / SAELens), constant_norm_rescale."""
    layer_norm_eps: float = 1e-5
    """Epsilon of layer_norm: x_n = (x - mean) / (std + eps), std unbiased, as in OpenAI's and SAELens' code."""
    source_format: str = "native"
    """Format the weights were read from (sparsify, saelens, unbox, native)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Free-form facts about origin: original config, file names, conversions applied."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("d_in", "n_latents"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SAEConfigError(f"SAEConfig.{name}: expected a positive integer, found {value!r}")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise SAEConfigError(
                f"SAEConfig.activation: expected one of {sorted(ACTIVATIONS)}, found {self.activation!r}"
            )
        if ACTIVATIONS[self.activation]:
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 0 < self.k <= self.n_latents:
                raise SAEConfigError(
                    f"SAEConfig.k: activation {self.activation!r} needs an integer k in 1..{self.n_latents}, "
                    f"found {self.k!r}"
                )
            if self.activation == "groupmax" and self.n_latents % self.k:
                raise SAEConfigError(
                    f"SAEConfig.k: groupmax splits {self.n_latents} latents into k={self.k} equal groups, "
                    f"which needs n_latents divisible by k"
                )
        elif self.k is not None:
            raise SAEConfigError(
                f"SAEConfig.k: activation {self.activation!r} keeps no top k, so k must be None, found {self.k!r}"
            )
        if not isinstance(self.input_space, str) or self.input_space not in INPUT_SPACES:
            raise SAEConfigError(
                f"SAEConfig.input_space: expected one of {INPUT_SPACES}, found {self.input_space!r}"
            )
        if self.model_family is not None and (not isinstance(self.model_family, str)
                                              or self.model_family not in MODEL_FAMILIES):
            raise SAEConfigError(
                f"SAEConfig.model_family: expected one of {MODEL_FAMILIES} or None, found {self.model_family!r}"
            )
        if not isinstance(self.normalization, str) or self.normalization not in NORMALIZATIONS:
            raise SAEConfigError(
                f"SAEConfig.normalization: expected one of {NORMALIZATIONS}, found {self.normalization!r}"
            )
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise SAEConfigError(f"SAEConfig.layer_norm_eps: expected a finite number >= 0, found {eps!r}")
        for name in ("hook_point", "model_family"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise SAEConfigError(f"SAEConfig.{name}: expected a string or None, found {getattr(self, name)!r}")
        if not isinstance(self.source_format, str):
            raise SAEConfigError(f"SAEConfig.source_format: expected a string, found {self.source_format!r}")
        if not isinstance(self.provenance, dict):
            raise SAEConfigError(
                f"SAEConfig.provenance: expected an object (dict), found {type(self.provenance).__name__}"
            )
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise SAEConfigError(
                f"SAEConfig.apply_b_dec_to_input: expected a bool, found {self.apply_b_dec_to_input!r}"
            )

    @property
    def is_topk(self) -> bool:
        return ACTIVATIONS[self.activation]

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)
