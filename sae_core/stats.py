"""Activation statistics: do edited feature maps stay in the distribution of unedited ones?

Two distances between an edited map and a reference (the unedited map, or concept-free maps):
  norm_w1         - the 1-D Wasserstein-1 distance between the distributions of per-token L2 norms
                    (integral of |F_a - F_b|), in activation units; PER only copies existing tokens, so
                    its token norms are drawn from the reference's own; steering creates new norms.
  channel_frechet - the Frechet (2-Wasserstein squared) distance between diagonal Gaussians fitted to
                    the per-channel moments: ||mu_a - mu_b||^2 + sum_c (sigma_a,c - sigma_b,c)^2.
Maps are channels-first [B, C, H, W] (a block's output); every spatial position of every image is a token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from .errors import SAEInputError


def tokens(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B*H*W, C] float64."""
    if x.ndim != 4:
        raise SAEInputError(f"stats: feature map has shape {tuple(x.shape)}, expected [B, C, H, W]")
    return rearrange(x, "b c h w -> (b h w) c").double()


def token_norms(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B*H*W] per-token L2 norms (float64)."""
    return tokens(x).norm(dim=-1)


class ChannelMoments(NamedTuple):
    mean: Tensor  # [C]
    var: Tensor  # [C], population variance


def channel_moments(x: Tensor) -> ChannelMoments:
    t = tokens(x)
    return ChannelMoments(t.mean(0), t.var(0, unbiased=False))


def wasserstein1(a: Tensor, b: Tensor) -> float:
    """Exact W1 between the empirical distributions of 1-D samples a [n] and b [m]."""
    a, b = a.double().flatten().sort().values, b.double().flatten().sort().values
    if a.numel() == 0 or b.numel() == 0:
        raise SAEInputError(f"wasserstein1: empty sample (sizes {a.numel()} and {b.numel()})")
    pts = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a, pts[:-1], right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, pts[:-1], right=True).double() / b.numel()
    return float(((cdf_a - cdf_b).abs() * pts.diff()).sum())


def frechet_diagonal(m1: ChannelMoments, m2: ChannelMoments) -> float:
    """||mu1 - mu2||^2 + sum_c (sqrt(var1_c) - sqrt(var2_c))^2."""
    return float(((m1.mean - m2.mean) ** 2).sum() + ((m1.var.sqrt() - m2.var.sqrt()) ** 2).sum())


class ActivationShift(NamedTuple):
    norm_w1: float  # W1 between token-norm distributions
    channel_frechet: float  # diagonal Frechet distance between channel moments
    norm_mean_ratio: float  # mean token norm edited / reference


def activation_shift(edited: Tensor, reference: Tensor) -> ActivationShift:
    """Distances of ``edited`` [B, C, H, W] from ``reference`` [B', C, H', W'] (shapes may differ but C)."""
    if edited.ndim != 4 or reference.ndim != 4 or edited.shape[1] != reference.shape[1]:
        raise SAEInputError(
            f"activation_shift: edited {tuple(edited.shape)} and reference {tuple(reference.shape)} must be "
            "[B, C, H, W] with the same C"
        )
    ne, nr = token_norms(edited), token_norms(reference)
    return ActivationShift(
        wasserstein1(ne, nr),
        frechet_diagonal(channel_moments(edited), channel_moments(reference)),
        float(ne.mean() / nr.mean().clamp_min(1e-12)),
    )
