"""Steering: edit SAE latents (or add decoder directions) and map back with an error term.

Methods (``strength`` is the one number each takes):
  saeuron_scale - f_i <- f_i * (gamma * mu_c,i(t)) where f_i > tau_i(t), i in S_t (SAeUron; gamma = strength,
                  negative to ablate);
  set           - f_i <- strength for i in S_t (on the mask, or on every patch);
  unbox_add     - x <- x + strength * sum_i mean_i * d_i (sdxl-unbox painting; mean_i = sae.latent_mean when the
                  SAE has it, else the concept's mu_c,i(t)), on the mask or on every patch;
  gsae_add      - x <- x + strength * ||x|| * sum_j d_j / ||d_j|| (G-SAE), on the mask or on every patch.
Error term for the result (f = codes of x, f' = edited codes):
  preserve       - x + decode(f') - decode(f) (default); rows whose codes did not change are returned bit-identical;
  legacy_saeuron - decode(f') + (decode(f) - x): the published SAeUron/SAEmnesia code, sign slip included
                   (docs/FORMULAS.md section 8); moves every patch by -2 (x - x_hat);
  none           - decode(f'): the pure reconstruction.
The add methods add their delta on top of the same base (x, decode(f) + (decode(f) - x), decode(f)).
The reconstruction includes a sparsify skip term (x W_skip^T) when the SAE has one, as its forward does.
``detected_only`` keeps every patch outside the detection mask bit-identical whatever the mode.

Options:
  use_beta (saeuron_scale; SAEmnesia) - the multiplier gamma * mu_c,i(t) becomes gamma * ||f|| / ||d_i||, with ||f||
                  the L2 norm of the patch's whole code vector and ||d_i|| the norm of latent i's decoder row;
  SAEs with an input normalisation (OpenAI / SAELens layer_norm): the add methods work in the SAE's input space like
                  the latent edits, so their delta is de-normalised (times the row's scale): x + out_scale * delta_n,
                  gsae_add measuring ||x_n|| of the normalised row;
  row_sign (steer_codes) - a per-row sign for the add methods: sdxl-unbox's SDXL-base app subtracts on the uncond
                  branch and adds on the cond one (BlockIntervention passes it for SteerSettings.cfg_sign="opposite").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .concepts import ConceptStep
from .detect import DetectionSettings
from .errors import SAEInputError
from .mixins import DictRoundTrip
from .sae import NormState

logger = logging.getLogger(__name__)

METHODS = ("saeuron_scale", "set", "unbox_add", "gsae_add")
ERROR_MODES = ("preserve", "legacy_saeuron", "none")
CFG_SIGNS = ("same", "opposite")


@dataclass(frozen=True)
class SteerSettings(DictRoundTrip):
    """method: one of METHODS; strength: gamma / value / strength / alpha (see module docstring);
    error: one of ERROR_MODES; detected_only: leave every undetected patch untouched;
    use_beta: SAEmnesia's multiplier gamma * ||f|| / ||d_i|| instead of gamma * mu (saeuron_scale only);
    cfg_sign: "same" adds the same delta on both CFG branches, "opposite" subtracts it on the uncond branch
    (sdxl-unbox on SDXL base; add methods only)."""

    method: str = "saeuron_scale"
    strength: float = -1.0
    error: str = "preserve"
    detected_only: bool = False
    use_beta: bool = False
    cfg_sign: str = "same"

    def __post_init__(self):
        if not isinstance(self.method, str) or not isinstance(self.error, str):
            raise SAEInputError(f"SteerSettings: method and error must be strings, found {self.method!r}, {self.error!r}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise SAEInputError(f"SteerSettings.strength is {self.strength!r}, expected a finite number")
        for name in ("detected_only", "use_beta"):
            if not isinstance(getattr(self, name), bool):
                raise SAEInputError(f"SteerSettings.{name} is {getattr(self, name)!r}, expected true or false")
        if not isinstance(self.cfg_sign, str) or self.cfg_sign not in CFG_SIGNS:
            raise SAEInputError(f"SteerSettings.cfg_sign is {self.cfg_sign!r}, expected one of {list(CFG_SIGNS)}")
        if self.cfg_sign == "opposite" and self.method not in ("unbox_add", "gsae_add"):
            raise SAEInputError(
                f"SteerSettings.cfg_sign 'opposite' flips the added direction on the uncond branch; method "
                f"{self.method!r} adds none: use unbox_add or gsae_add, or cfg_sign 'same'"
            )
        if self.use_beta and self.method != "saeuron_scale":
            raise SAEInputError(f"SteerSettings.use_beta scales saeuron_scale's multiplier; method is {self.method!r}")
        if self.method not in METHODS:
            raise SAEInputError(f"SteerSettings.method is {self.method!r}, expected one of {list(METHODS)}")
        if self.error not in ERROR_MODES:
            raise SAEInputError(f"SteerSettings.error is {self.error!r}, expected one of {list(ERROR_MODES)}")
        if not torch.isfinite(torch.tensor(float(self.strength))):
            raise SAEInputError(f"SteerSettings.strength is {self.strength}, expected a finite number")


class SteerCodes(NamedTuple):
    """The codes of the rows to steer."""

    picked: Tensor  # [..., K] codes of step.latents (the TopK hot path builds no [..., M] codes)
    norm: NormState | None  # the SAE's normalisation state from the same encode
    dense: Callable[[], Tensor]  # () -> [..., M] codes; called only where the whole reconstruction is needed


class SteerResult(NamedTuple):
    values: Tensor  # [..., d] edited SAE-input vectors
    changed: Tensor  # [...] bool: rows that differ from the input


def unbox_delta(x: Tensor, directions: Tensor, means: Tensor, strength: float) -> Tensor:
    """sdxl-unbox: strength * sum_i mean_i * d_i, directions [K, d], means [K] -> [d] in x's dtype."""
    return (float(strength) * (means.float()[:, None] * directions.float()).sum(0)).to(x.dtype)


def gsae_delta(x: Tensor, directions: Tensor, alpha: float) -> Tensor:
    """G-SAE: alpha * ||x|| * sum_j d_j / ||d_j||, x [..., d], directions [K, d] -> [..., d]."""
    unit = directions.float() / directions.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (float(alpha) * x.float().norm(dim=-1, keepdim=True) * unit.sum(0)).to(x.dtype)


def steer(sae, x: Tensor, codes: Tensor, norm, step: ConceptStep, mask: Tensor, settings: SteerSettings,
          threshold_scale: float = 1.0) -> SteerResult:
    """x [..., d] SAE inputs, codes [..., M] = their codes (with ``norm`` from encode_with_norm),
    mask [...] detection -> SteerResult. Thresholds are scaled by ``threshold_scale`` like detection."""
    if codes.shape[:-1] != x.shape[:-1] or mask.shape != x.shape[:-1]:
        raise SAEInputError(
            f"steer: x {tuple(x.shape)}, codes {tuple(codes.shape)} and mask {tuple(mask.shape)} must share leading dims"
        )
    sub = codes.index_select(-1, step.latents.to(codes.device))
    return steer_codes(sae, x, SteerCodes(sub, norm, lambda: codes), step, mask, settings,
                       DetectionSettings(threshold_scale=threshold_scale))


def steer_picked(sae, x: Tensor, sub: Tensor, dense_codes, norm, step: ConceptStep, mask: Tensor,
                 settings: SteerSettings, threshold_scale: float = 1.0, row_sign: Tensor | None = None) -> SteerResult:
    """``steer`` from sub [..., K] = the codes of ``step.latents`` only, ``dense_codes()`` -> [..., M]
    (see ``steer_codes``)."""
    return steer_codes(sae, x, SteerCodes(sub, norm, dense_codes), step, mask, settings,
                       DetectionSettings(threshold_scale=threshold_scale), row_sign)


def steer_codes(sae, x: Tensor, codes: SteerCodes, step: ConceptStep, mask: Tensor, settings: SteerSettings,
                detection: DetectionSettings, row_sign: Tensor | None = None) -> SteerResult:
    """x [..., d] SAE inputs, ``codes`` their codes, mask [...] the rows to edit -> SteerResult. Thresholds are
    scaled like detection's (``detection.threshold_scale``), so both agree on every patch.

    No host synchronisation: ``values`` is a new tensor even when ``changed`` is all false (rows not changed are
    bit-identical to x).
    """
    sub, norm, dense_codes = codes
    if sub.shape[:-1] != x.shape[:-1] or mask.shape != x.shape[:-1] or sub.shape[-1] != step.latents.numel():
        raise SAEInputError(
            f"steer: x {tuple(x.shape)}, picked codes {tuple(sub.shape)} (one column per selected latent, "
            f"{step.latents.numel()}) and mask {tuple(mask.shape)} must share leading dims"
        )
    s = settings
    region = mask if s.detected_only else None
    lat = step.latents
    new_sub = None
    delta = None
    if lat.numel() and s.method == "saeuron_scale":
        # the same float32 comparison as detection (score = f - scale * tau > 0), whatever the input dtype, so
        # detection and steering agree on every patch near tau in fp16 / bf16 too
        fire = sub.float() > float(detection.threshold_scale) * step.thresholds.to(sub.device, torch.float32)
        if region is not None:
            fire = fire & region[..., None]
        if s.use_beta:  # SAEmnesia: gamma * ||f|| / ||d_i||, per patch and latent
            f_norm = dense_codes().float().norm(dim=-1, keepdim=True)
            d_norm = _decoder_rows(sae, lat, sub.device).float().norm(dim=-1)
            factor = (float(s.strength) * f_norm / d_norm.clamp_min(1e-12)).to(sub.dtype)
        else:
            factor = (float(s.strength) * step.means.to(sub.device, torch.float32)).to(sub.dtype)
        new_sub = torch.where(fire, sub * factor, sub)
    elif lat.numel() and s.method == "set":
        new_sub = torch.full_like(sub, float(s.strength))
        if region is not None:
            new_sub = torch.where(region[..., None], new_sub, sub)
    elif lat.numel():
        dirs = _decoder_rows(sae, lat, x.device)
        scale = None if norm is None else getattr(norm, "out_scale", None)
        if s.method == "unbox_add":
            lm = getattr(sae, "latent_mean", None)
            means = (lm.detach()[lat.to(lm.device)] if lm is not None else step.means).to(x.device)
            delta = unbox_delta(x, dirs, means, s.strength).expand_as(x)
        else:  # G-SAE's ||x|| is the norm of the row the SAE reads (normalised when the SAE normalises)
            xn = x if scale is None else (x - (0 if norm.mean is None else norm.mean)) / norm.in_scale
            delta = gsae_delta(xn, dirs, s.strength)
        if scale is not None:  # the direction lives in the SAE's normalised space: map it back like decode does
            delta = (delta * scale).to(x.dtype)
        if row_sign is not None:
            delta = delta * row_sign.to(delta.device, delta.dtype).view(-1, *([1] * (delta.ndim - 1)))
    add_rows = None if delta is None else (mask if s.detected_only else torch.ones_like(mask))

    code_delta = None
    rows = torch.zeros_like(mask)
    if new_sub is not None:
        rows = (new_sub != sub).any(-1)
        code_delta = _picked_delta(sae, sub, new_sub, lat, norm, dense_codes)

    if s.error == "preserve":
        out = x if code_delta is None else x + code_delta
        if delta is not None:
            out = out + delta
            rows = rows | add_rows
        return SteerResult(torch.where(rows[..., None], out, x), rows)

    recon = sae.decode(dense_codes(), norm)
    if getattr(sae, "W_skip", None) is not None:  # sparsify's skip term is part of the published reconstruction
        recon = recon + x @ sae.weights(x.device, x.dtype).W_skip.mT
    recon2 = recon if code_delta is None else recon + code_delta
    out = recon2 + (recon - x) if s.error == "legacy_saeuron" else recon2
    if delta is not None:
        out = out + torch.where(add_rows[..., None], delta, torch.zeros_like(delta))
    if s.detected_only:
        out = torch.where(mask[..., None], out, x)
        return SteerResult(out, mask.clone())
    return SteerResult(out, torch.ones_like(mask))


def _picked_delta(sae, sub: Tensor, new_sub: Tensor, latents: Tensor, norm, dense_codes) -> Tensor:
    """decode(edited) - decode(codes) where only the ``latents`` columns changed from sub to new_sub:
    [..., K] @ W_dec[K] instead of two dense [..., M] decodes. Exact for the affine decode
    x_hat = denorm(f W_dec + b_dec) of SparseAutoencoder, whose de-normalisation is y * out_scale + mean per row."""
    lat = latents.to(sub.device)
    W = sae.weights(sub.device, sub.dtype).W_dec
    delta = (new_sub - sub) @ W.index_select(0, lat)
    if norm is not None:
        scale = getattr(norm, "out_scale", None)
        if scale is None:  # an unknown normalisation state: the two full decodes
            codes = dense_codes()
            edited = codes.clone()
            edited[..., lat] = new_sub
            return sae.decode(edited, norm) - sae.decode(codes, norm)
        delta = delta * scale
    return delta


def _decoder_rows(sae, latents: Tensor, device: torch.device) -> Tensor:
    """Rows ``latents`` of W_dec on ``device`` in the stored dtype (the directions the add methods add, at full
    precision whatever the activations' dtype), through the SAE's weight cache."""
    return sae.weights(device, sae.stored_dtype).W_dec.index_select(0, latents.to(device))
