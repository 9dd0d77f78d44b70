"""Published behaviours (SAEmnesia use_beta, the legacy SAeUron hook with W_skip, add methods under LayerNorm,
sdxl-unbox's opposite signs per CFG branch, a painted region, Sigmoid(TopK) firing, fp16 agreement of detection and
steering, non-finite patches), each against a float64 reference written here from docs/FORMULAS.md's formulas."""

import logging

import numpy as np
import pytest
import torch
from einops import rearrange
from sae_builders import random_weights

from nodes import resolve
from sae_core.concept_stats import ConceptStatsAccumulator
from sae_core.concepts import ConceptDictionary
from sae_core.config import SAEConfig
from sae_core.detect import ConceptDetector, detect_picked
from sae_core.intervention import BlockIntervention, StepInfo
from sae_core.replace import replace_patches
from sae_core.sae import SparseAutoencoder
from sae_core.steer import SteerSettings, steer, steer_picked

D, M, K = 12, 40, 6


def make_sae(*, activation="relu_topk", normalization="none", skip=False, seed=0, bias_shift=0.0):
    w = random_weights(D, M, seed=seed, sparse_bias=False)
    w["b_enc"] = w["b_enc"] - bias_shift
    w["W_dec"] = w["W_dec"] * torch.linspace(0.5, 2.0, M)[:, None]  # rows of different norms: ||d_i|| matters
    if skip:
        w["W_skip"] = torch.randn(D, D, generator=torch.Generator().manual_seed(seed + 7)) * 0.1
    cfg = SAEConfig(d_in=D, n_latents=M, k=K, activation=activation, normalization=normalization)
    return SparseAutoencoder(cfg, **w), {k: v.double().numpy() for k, v in w.items()}


def tokens(B=2, H=3, W=5, seed=1):
    return torch.randn(B, H, W, D, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def ref_codes(x, w, k=K):
    """relu_topk in float64: ReLU(W_enc (x - b_dec) + b_enc), top k kept."""
    pre = np.maximum((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"], 0)
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=-1)[..., :k]
    np.put_along_axis(out, idx, np.take_along_axis(pre, idx, -1), -1)
    return out


def firing_step(sae, x, n=3):
    """A concept of the n latents most often active on x, threshold 0.05, distinct means."""
    codes = sae.encode(x)
    lat = torch.argsort((codes > 0).float().sum((0, 1, 2)), descending=True)[:n]
    d = ConceptDictionary.from_latents(lat.tolist(), M, threshold=0.05, means=[0.3, 0.7, 1.1][:n])
    return d.at(0.0)


@pytest.mark.parametrize("gamma", [-2.0, 0.5])
def test_saemnesia_use_beta(gamma):
    sae, w = make_sae()
    x = tokens()
    codes, norm = sae.encode_with_norm(x)
    step = firing_step(sae, x)
    mask = torch.zeros(x.shape[:-1], dtype=torch.bool)
    r = steer(sae, x, codes, norm, step, mask, SteerSettings("saeuron_scale", gamma, use_beta=True))
    f = ref_codes(x.double().numpy(), w)
    lat, tau = step.latents.numpy(), step.thresholds.double().numpy()
    # SAEmnesia: the multiplier gamma * mu becomes gamma * ||f|| / ||d_i|| (f the patch's whole code vector)
    factor = gamma * np.linalg.norm(f, axis=-1, keepdims=True) / np.linalg.norm(w["W_dec"][lat], axis=-1)
    sub = f[..., lat]
    f2 = f.copy()
    f2[..., lat] = np.where(sub > tau, sub * factor, sub)
    ref = x.double().numpy() + (f2 - f) @ w["W_dec"]
    assert (np.abs(f2 - f).sum(-1) > 0).sum() > 5  # the test edits a fair number of patches
    np.testing.assert_allclose(r.values.double().numpy(), ref, rtol=1e-4, atol=1e-4)


def test_use_beta_needs_saeuron_scale():
    with pytest.raises(ValueError, match="use_beta scales saeuron_scale's multiplier; method is 'set'"):
        SteerSettings("set", 1.0, use_beta=True)


@pytest.mark.parametrize("method, strength", [("saeuron_scale", -3.0), ("set", 0.0)])
def test_legacy_saeuron_includes_the_skip_term(method, strength):
    sae, w = make_sae(skip=True)
    x = tokens()
    codes, norm = sae.encode_with_norm(x)
    step = firing_step(sae, x)
    mask = torch.zeros(x.shape[:-1], dtype=torch.bool)
    r = steer(sae, x, codes, norm, step, mask, SteerSettings(method, strength, error="legacy_saeuron"))
    xn = x.double().numpy()
    f = ref_codes(xn, w)
    lat, tau, mu = step.latents.numpy(), step.thresholds.double().numpy(), step.means.double().numpy()
    f2 = f.copy()
    if method == "saeuron_scale":
        f2[..., lat] = np.where(f[..., lat] > tau, f[..., lat] * strength * mu, f[..., lat])
    else:
        f2[..., lat] = strength

    def recon(c):  # sparsify's forward: decode plus the skip connection of the raw input
        return c @ w["W_dec"] + w["b_dec"] + xn @ w["W_skip"].T

    ref = recon(f2) + (recon(f) - xn)  # the published hook, sign slip included (docs/FORMULAS.md section 3)
    np.testing.assert_allclose(r.values.double().numpy(), ref, rtol=1e-4, atol=1e-4)
    # and the module's own forward agrees that the skip term is part of the reconstruction
    np.testing.assert_allclose(sae(x).x_hat.double().numpy(), recon(f), rtol=1e-4, atol=1e-4)


def ref_layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    std = x.std(-1, ddof=1, keepdims=True)
    return mean, std, (x - mean) / (std + 1e-5)


@pytest.mark.parametrize("method", ["unbox_add", "gsae_add"])
def test_add_methods_under_layer_norm(method):
    """OpenAI TopK SAEs normalise their input: a direction of the SAE's space scales back by the row's std."""
    sae, w = make_sae(activation="topk_relu", normalization="layer_norm")
    x = tokens()
    codes, norm = sae.encode_with_norm(x)
    lat = [2, 9, 30]
    step = ConceptDictionary.from_latents(lat, M, threshold=0.0, means=[0.4, 1.5, 0.9]).at(0.0)
    mask = torch.zeros(x.shape[:-1], dtype=torch.bool)
    r = steer(sae, x, codes, norm, step, mask, SteerSettings(method, 3.0))
    xn = x.double().numpy()
    _, std, x_norm = ref_layer_norm(xn)
    d = w["W_dec"][lat]
    if method == "unbox_add":  # strength * sum_i mean_i * d_i in the SAE's space
        delta_n = 3.0 * (np.array([0.4, 1.5, 0.9])[:, None] * d).sum(0)
    else:  # G-SAE: alpha * ||x_n|| * sum_j d_j / ||d_j||
        delta_n = 3.0 * np.linalg.norm(x_norm, axis=-1, keepdims=True) * (d / np.linalg.norm(d, axis=-1, keepdims=True)).sum(0)
    ref = xn + std * delta_n  # de-normalise (x_n + delta_n): x + std * delta_n
    np.testing.assert_allclose(r.values.double().numpy(), ref, rtol=1e-4, atol=1e-4)


def detector_for(sae, lat, threshold=0.05, means=None):
    return ConceptDetector(ConceptDictionary.from_latents(lat, M, threshold=threshold, means=means), sae=sae)


@pytest.mark.parametrize("chunks", [(1, 0), (0, 1), (0, 1, 1, 0)])
def test_unbox_opposite_signs_per_cfg_branch(chunks):
    """sdxl-unbox on SDXL base: subtract on the uncond branch, add on the cond one, any chunk layout."""
    sae, w = make_sae()
    n = 2
    x = rearrange(tokens(B=n * len(chunks), H=3, W=4), "b h w c -> b c h w")
    lat, means = [5, 17], [0.6, 1.3]
    iv = BlockIntervention(sae, detector_for(sae, lat, means=means),
                           SteerSettings("unbox_add", 2.5, cfg_sign="opposite"), branches="both")
    out = iv(None, x, StepInfo(500.0, chunks=chunks))
    delta = 2.5 * (np.array(means)[:, None] * w["W_dec"][lat]).sum(0)
    for c, flag in enumerate(chunks):
        rows = slice(c * n, (c + 1) * n)
        sign = -1.0 if flag == 1 else 1.0
        ref = rearrange(x[rows], "b c h w -> b h w c").double().numpy() + sign * delta
        got = rearrange(out[rows], "b c h w -> b h w c").double().numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    same = BlockIntervention(sae, detector_for(sae, lat, means=means), SteerSettings("unbox_add", 2.5))(
        None, x, StepInfo(500.0, chunks=chunks))
    uncond = [c for c, f in enumerate(chunks) if f == 1][0]
    assert not torch.allclose(same[uncond * n:(uncond + 1) * n], out[uncond * n:(uncond + 1) * n])


def ref_region_grid(region, H, W):
    """A patch is inside where at least half of its pixels are painted (image size a multiple of the grid)."""
    n, h, w = region.shape
    cells = region.reshape(n, H, h // H, W, w // W).mean((2, 4))
    return cells >= 0.5


@pytest.mark.parametrize("mode", ["replace", "intersect"])
def test_painted_region_replaces_or_intersects_the_detection(mode):
    sae, w = make_sae()
    H, W = 4, 5
    x = rearrange(tokens(B=2, H=H, W=W, seed=3), "b h w c -> b c h w")
    g = torch.Generator().manual_seed(5)
    region = (torch.rand(1, H * 8, W * 8, generator=g) > 0.5).float()
    region[:, :, : W * 4] = 1.0  # the left half fully painted, the rest speckled
    step_lat = [3]
    det = detector_for(sae, step_lat, threshold=0.0)
    iv = BlockIntervention(sae, det, SteerSettings("set", 0.0, detected_only=True), branches="both",
                           region=region, region_mode=mode)
    out = iv(None, x, StepInfo(10.0, chunks=(0,)))
    user = torch.from_numpy(ref_region_grid(region.numpy(), H, W))[0]
    codes = sae.encode(rearrange(x, "b c h w -> b h w c"))
    detected = codes[..., 3] > 0.0
    expect = user.expand_as(detected) if mode == "replace" else detected & user
    # set f_3 <- 0 on the edited patches: x + (0 - f_3) d_3 there, x bit-identical elsewhere
    xt = rearrange(x, "b c h w -> b h w c").double().numpy()
    f3 = codes[..., 3].double().numpy()
    ref = np.where(expect.numpy()[..., None], xt - f3[..., None] * w["W_dec"][3], xt)
    np.testing.assert_allclose(rearrange(out, "b c h w -> b h w c").double().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert bool(expect.any()) and not bool(expect.all())


def test_region_batch_must_match():
    sae, _ = make_sae()
    iv = BlockIntervention(sae, detector_for(sae, [3]), SteerSettings("set", 0.0, detected_only=True),
                           region=torch.ones(3, 8, 8))
    x = rearrange(tokens(B=2, H=2, W=2), "b h w c -> b c h w")
    with pytest.raises(ValueError, match="the region mask has 3 images, expected 1 or 2"):
        iv(None, x, StepInfo(1.0))


def test_specific_rule_firing_for_sigmoid_topk():
    """Every kept latent of a Sigmoid(TopK) SAE has a positive code; firing means a positive pre-activation."""
    sae, w = make_sae(activation="sigmoid_topk", bias_shift=1.5)  # many kept pre-activations are negative
    x = tokens(B=3)
    acc = ConceptStatsAccumulator(M, fire_above=sae.firing_level)
    acc.add("c", 10.0, sae.encode(x))
    acc.add("other", 10.0, sae.encode(tokens(B=2, seed=9)))
    rates = acc.stats().rates[0, 0].numpy()
    pre = (x.double().numpy() - w["b_dec"]) @ w["W_enc"].T + w["b_enc"]
    kept = np.zeros_like(pre, dtype=bool)
    np.put_along_axis(kept, np.argsort(-pre, axis=-1)[..., :K], True, -1)
    ref = (kept & (pre > 0)).reshape(-1, M).mean(0)
    np.testing.assert_allclose(rates, ref, atol=1e-12)
    naive = ConceptStatsAccumulator(M)  # code > 0: every kept latent, negatives included
    naive.add("c", 10.0, sae.encode(x))
    naive.add("other", 10.0, sae.encode(tokens(B=2, seed=9)))
    assert float(naive.stats().rates[0, 0].sum()) > float(rates.sum())


def test_detection_and_steering_agree_in_fp16():
    """Codes that round onto tau in fp16: detection (float32) and steering must take the same decision."""
    sae, _ = make_sae()
    step = ConceptDictionary.from_latents([0, 1], M, threshold=0.99995, means=[1.0, 1.0]).at(0.0)
    sub = torch.tensor([[1.0, 0.0], [0.9995, 0.0], [0.0, 1.0009]], dtype=torch.float16).view(1, 3, 1, 2)
    x = torch.zeros(1, 3, 1, D, dtype=torch.float16)
    det = detect_picked(sub, step)
    r = steer_picked(sae, x, sub, lambda: None, None, step, det.mask, SteerSettings("saeuron_scale", -1.0))
    assert det.mask.flatten().tolist() == [True, False, True]
    assert torch.equal(r.changed, det.mask)


@pytest.mark.parametrize("mode", ["random", "nearest", "mean"])
def test_non_finite_patches_are_never_sources(mode):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(2, 4, 6, 3, generator=g)
    bad = torch.zeros(2, 4, 6, dtype=torch.bool)
    bad[0, 0, :4] = True
    bad[1, 3, 5] = True
    values[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[:, 1:3, 1:4] = True
    out = replace_patches(values, mask, mode, torch.Generator().manual_seed(1)).values
    assert bool(torch.isfinite(out[~bad]).all())  # no NaN/inf reached a finite patch
    torch.testing.assert_close(out[~mask & ~bad], values[~mask & ~bad])  # undetected patches are not written
    if mode == "mean":  # the mean of the finite undetected patches only (float64 reference)
        for b in range(2):
            src = values[b][~mask[b] & ~bad[b]].double().mean(0)
            torch.testing.assert_close(out[b][mask[b]].double(), src.expand(int(mask[b].sum()), 3), rtol=1e-6, atol=1e-6)


def test_non_finite_block_warns_once(caplog):
    sae, _ = make_sae()
    x = rearrange(tokens(B=1, H=3, W=3), "b h w c -> b c h w").clone()
    x[0, :, 0, 0] = float("nan")
    iv = BlockIntervention(sae, detector_for(sae, [3]), SteerSettings("set", 0.0), label="up.1.1")
    with caplog.at_level(logging.WARNING, logger="sae_core.intervention"):
        for t in (900.0, 800.0, 700.0):
            out = iv(None, x, StepInfo(t))
    hits = [r for r in caplog.records if "NaN/inf activations" in r.getMessage()]
    assert len(hits) == 1 and "up.1.1" in hits[0].getMessage() and "900.0" in hits[0].getMessage()
    assert out.shape == x.shape


def test_legacy_ignores_detected_only_in_the_node():
    """SAE Steer's default detected_only=True must not cut the published hook down to the detected patches."""
    s = resolve.steer_settings("saeuron_scale", -1.0, "legacy_saeuron", True)
    assert s.detected_only is False and s.error == "legacy_saeuron"
    assert resolve.steer_settings("saeuron_scale", -1.0, "preserve", True).detected_only is True
    sae, w = make_sae()
    x = tokens()
    codes, norm = sae.encode_with_norm(x)
    step = firing_step(sae, x)
    det = codes.index_select(-1, step.latents)[..., 0] > 10.0  # a detector that finds nothing
    r = steer(sae, x, codes, norm, step, det, s)
    xn = x.double().numpy()
    f = ref_codes(xn, w)
    recon = f @ w["W_dec"] + w["b_dec"]
    lat, tau, mu = step.latents.numpy(), step.thresholds.double().numpy(), step.means.double().numpy()
    f2 = f.copy()
    f2[..., lat] = np.where(f[..., lat] > tau, -1.0 * f[..., lat] * mu, f[..., lat])
    ref = (f2 @ w["W_dec"] + w["b_dec"]) + (recon - xn)  # every patch moves, as in the published hook
    np.testing.assert_allclose(r.values.double().numpy(), ref, rtol=1e-4, atol=1e-4)
