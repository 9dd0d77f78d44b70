"""Activation statistics against independent NumPy versions; steering moves the planted set further than PER."""

import numpy as np
import pytest
import torch
from einops import rearrange
from planted import coverage_regions, planted_maps, planted_sae

from sae_core.concept_stats import ConceptStatsAccumulator
from sae_core.detect import ConceptDetector
from sae_core.intervention import BlockIntervention, ReplaceSettings, StepInfo
from sae_core.selection import SelectionRule, build_concept_dictionary
from sae_core.stats import activation_shift, channel_moments, frechet_diagonal, token_norms, wasserstein1
from sae_core.steer import SteerSettings


def ref_w1(a, b):
    """Integral over u of |Q_a(u) - Q_b(u)| with the empirical quantile functions (step functions)."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    n, m = len(a), len(b)
    us = np.unique(np.concatenate([np.arange(n + 1) / n, np.arange(m + 1) / m]))
    total = 0.0
    for lo, hi in zip(us[:-1], us[1:], strict=True):
        mid = (lo + hi) / 2
        total += (hi - lo) * abs(a[int(np.ceil(mid * n)) - 1] - b[int(np.ceil(mid * m)) - 1])
    return total


@pytest.mark.parametrize("n,m", [(50, 50), (37, 80), (1, 9)])
def test_wasserstein1_matches_quantile_integral(n, m):
    g = torch.Generator().manual_seed(n + m)
    a, b = torch.randn(n, generator=g), torch.randn(m, generator=g) * 2 + 0.5
    assert wasserstein1(a, b) == pytest.approx(ref_w1(a.numpy(), b.numpy()), rel=1e-9, abs=1e-12)


def test_wasserstein1_known_values():
    assert wasserstein1(torch.tensor([0.0]), torch.tensor([1.0, 2.0])) == pytest.approx(1.5)
    x = torch.randn(100)
    assert wasserstein1(x, x + 0.25) == pytest.approx(0.25)
    assert wasserstein1(x, x[torch.randperm(100)]) == 0.0
    with pytest.raises(ValueError, match="empty sample"):
        wasserstein1(torch.zeros(0), x)


def test_moments_norms_and_frechet_match_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, 3, 5, generator=g), torch.randn(3, 6, 4, 2, generator=g) * 1.5
    ta = a.permute(0, 2, 3, 1).reshape(-1, 6).double().numpy()
    tb = b.permute(0, 2, 3, 1).reshape(-1, 6).double().numpy()
    torch.testing.assert_close(token_norms(a), torch.from_numpy(np.linalg.norm(ta, axis=1)))
    ma, mb = channel_moments(a), channel_moments(b)
    torch.testing.assert_close(ma.mean, torch.from_numpy(ta.mean(0)))
    torch.testing.assert_close(ma.var, torch.from_numpy(ta.var(0)))
    ref = ((ta.mean(0) - tb.mean(0)) ** 2).sum() + ((ta.std(0) - tb.std(0)) ** 2).sum()
    assert frechet_diagonal(ma, mb) == pytest.approx(ref, rel=1e-9)
    s = activation_shift(a, b)
    assert s.norm_w1 == pytest.approx(ref_w1(np.linalg.norm(ta, axis=1), np.linalg.norm(tb, axis=1)), rel=1e-9)
    assert s.channel_frechet == pytest.approx(ref, rel=1e-9)
    z = activation_shift(a, a)
    assert z.norm_w1 == 0.0 and z.channel_frechet == 0.0 and z.norm_mean_ratio == 1.0


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"expected \[B, C, H, W\]"):
        token_norms(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="same C"):
        activation_shift(torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 2, 2))


def learned_planted_detector(sae, u, H, W):
    """The full path: accumulate codes of planted maps and of clean maps, build the SAeUron dictionary."""
    acc = ConceptStatsAccumulator(sae.cfg.n_latents)
    for t in (900.0, 100.0):
        obj = planted_maps(4, H, W, u, seed=5, region=coverage_regions(4, H, W, 0.3, seed=5))
        acc.add("concept", t, sae.encode(rearrange(obj.block_out, "b c h w -> b h w c")))
        clean = planted_maps(4, H, W, u, seed=6, region=torch.zeros(4, H, W, dtype=torch.bool))
        acc.add("clean", t, sae.encode(rearrange(clean.block_out, "b c h w -> b h w c")))
    d = build_concept_dictionary(acc.stats(), SelectionRule("top_n", top_n=1), keep=["concept"],
                                 sae_fingerprint=sae.fingerprint())
    assert d.latents[0, :, 0].tolist() == [0, 0]  # the planted latent wins the SAeUron score
    return ConceptDetector(d, sae=sae)


@pytest.mark.parametrize("hw", [(6, 9), (8, 5)])
def test_steering_moves_the_planted_set_further_than_per(hw):
    sae, u = planted_sae()
    det = learned_planted_detector(sae, u, *hw)
    pm = planted_maps(4, *hw, u, region=coverage_regions(4, *hw, 0.3, seed=1))  # an object on ~30% of the map
    step = StepInfo(500.0, chunks=(1, 0))
    per = BlockIntervention(sae, det, ReplaceSettings(seed=0))(None, pm.block_out, step)
    steered = BlockIntervention(sae, det, SteerSettings("saeuron_scale", -10.0))(None, pm.block_out, step)
    d_per, d_steer = activation_shift(per, pm.block_out), activation_shift(steered, pm.block_out)
    assert d_steer.norm_w1 > 2 * d_per.norm_w1
    assert d_steer.channel_frechet > d_per.channel_frechet
