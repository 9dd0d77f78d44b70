"""Planted-concept world: feature maps with a known direction u planted in known regions, and a real
SparseAutoencoder whose latent 0 reads and writes exactly along u (encoder and decoder row 0 = u).

Background tokens are orthogonal to u and b_dec is orthogonal to u, so latent 0 is 0 on background
and equals the planted amplitude (2..3) on planted patches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import SAEConfig
from .sae import SparseAutoencoder

AMP_LOW, AMP_HIGH = 2.0, 3.0


class Planted(NamedTuple):
    block_in: torch.Tensor  # [B, C, H, W]
    block_out: torch.Tensor  # [B, C, H, W]
    region: torch.Tensor  # [B, H, W] bool, where u was planted
    u: torch.Tensor  # [C] unit direction


def direction(d: int, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    return u / u.norm()


def orthogonal(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x [..., d] with its component along unit u removed."""
    return x - (x @ u)[..., None] * u


def planted_sae(d: int = 16, M: int = 24, *, input_space: str = "output", activation: str = "relu",
                k: int | None = None, seed: int = 0, latent_mean: bool = False, normalization: str = "none") -> tuple[SparseAutoencoder, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = direction(d)
    W_enc = orthogonal(torch.randn(M, d, generator=g) / d**0.5, u)
    W_enc[0] = u
    b_enc = torch.randn(M, generator=g) * 0.05
    b_enc[0] = 0.0
    W_dec = torch.randn(M, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    W_dec[0] = u
    b_dec = orthogonal(torch.randn(d, generator=g) * 0.1, u)
    cfg = SAEConfig(d_in=d, n_latents=M, k=k, activation=activation, input_space=input_space,
                    hook_point="up_blocks.1.attentions.1", model_family="sd1", normalization=normalization)
    lm = (torch.rand(M, generator=g) + 0.5) if latent_mean else None
    return SparseAutoencoder(cfg, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, latent_mean=lm,
                             source="planted-sae"), u


def regions(B: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """One rectangle per image (different per image), plus a single isolated patch on odd images."""
    g = torch.Generator().manual_seed(seed)
    r = torch.zeros(B, H, W, dtype=torch.bool)
    for b in range(B):
        h0 = int(torch.randint(0, max(H - 1, 1), (1,), generator=g))
        w0 = int(torch.randint(0, max(W - 1, 1), (1,), generator=g))
        hh = 1 + int(torch.randint(0, max(H // 2, 1), (1,), generator=g))
        ww = 1 + int(torch.randint(0, max(W // 2, 1), (1,), generator=g))
        r[b, h0:h0 + hh, w0:w0 + ww] = True
        if b % 2 == 1:
            r[b, H - 1, W - 1] = True
    return r


def coverage_regions(B: int, H: int, W: int, coverage: float, seed: int = 0) -> torch.Tensor:
    """One rectangle per image covering about ``coverage`` of the map (an object), at a random place."""
    g = torch.Generator().manual_seed(seed)
    r = torch.zeros(B, H, W, dtype=torch.bool)
    side = coverage ** 0.5
    hh, ww = max(1, round(H * side)), max(1, round(W * side))
    for b in range(B):
        h0 = int(torch.randint(0, H - hh + 1, (1,), generator=g))
        w0 = int(torch.randint(0, W - ww + 1, (1,), generator=g))
        r[b, h0:h0 + hh, w0:w0 + ww] = True
    return r


def planted_maps(B: int, H: int, W: int, u: torch.Tensor, *, residual: bool = False, region: torch.Tensor | None = None,
                 seed: int = 0) -> Planted:
    """block_out = bg + a * u on the region (a in [2, 3]); residual=True plants u in out - in instead."""
    g = torch.Generator().manual_seed(seed + 1)
    d = u.numel()
    region = regions(B, H, W, seed) if region is None else region
    amp = AMP_LOW + (AMP_HIGH - AMP_LOW) * torch.rand(B, H, W, generator=g)
    bg = orthogonal(torch.randn(B, H, W, d, generator=g), u)
    upd = bg + torch.where(region, amp, torch.zeros(())).unsqueeze(-1) * u
    block_in = orthogonal(torch.randn(B, H, W, d, generator=g), u) if residual else torch.randn(B, H, W, d, generator=g)
    block_out = block_in + upd if residual else upd
    cf = lambda t: t.permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return Planted(cf(block_in), cf(block_out), region, u)
