"""Steering on the planted set against an independent float64 reference of each published formula."""

import numpy as np
import pytest
import torch
from einops import rearrange
from planted import planted_maps, planted_sae

from sae_core.concepts import ConceptDictionary
from sae_core.steer import SteerSettings, steer

GRIDS = [(5, 7), (4, 6)]
MU0 = 0.7


def setup(H, W, *, latent_mean=False, B=3):
    sae, u = planted_sae(latent_mean=latent_mean)
    pm = planted_maps(B, H, W, u)
    x = rearrange(pm.block_out, "b c h w -> b h w c")
    codes, norm = sae.encode_with_norm(x)
    step = ConceptDictionary.from_latents([0], sae.cfg.n_latents, threshold=1.0, means=[MU0]).at(0.0)
    mask = codes[..., 0] > 1.0
    return sae, u, x, codes, norm, step, mask, pm.region


def np64(t):
    return t.detach().double().numpy()


def ref_decode(sae, f):
    return f @ np64(sae.W_dec) + np64(sae.b_dec)


def ref_scaled(codes, gamma, tau=1.0, mu=MU0):
    f = np64(codes).copy()
    fire = f[..., 0] > tau
    f[..., 0] = np.where(fire, f[..., 0] * gamma * mu, f[..., 0])
    return f


@pytest.mark.parametrize("hw", GRIDS)
@pytest.mark.parametrize("gamma", [-10.0, -1.0, 0.5])
def test_saeuron_preserve(hw, gamma):
    sae, u, x, codes, norm, step, mask, region = setup(*hw)
    assert torch.equal(mask, region)
    r = steer(sae, x, codes, norm, step, mask, SteerSettings("saeuron_scale", gamma))
    assert torch.equal(r.values[~region], x[~region])  # bit-identical where nothing fired
    assert torch.equal(r.changed, region)
    f = np64(codes)
    ref = np64(x) + ref_decode(sae, ref_scaled(codes, gamma)) - ref_decode(sae, f)
    torch.testing.assert_close(r.values.double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)
    # the planted component becomes gamma * mu * a: the concept's latent moved exactly as asked
    torch.testing.assert_close((r.values[region] @ u).double(), torch.from_numpy(f[..., 0][np64(region) > 0] * gamma * MU0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", GRIDS)
def test_legacy_saeuron_reproduces_the_published_formula(hw):
    sae, u, x, codes, norm, step, mask, region = setup(*hw)
    r = steer(sae, x, codes, norm, step, mask, SteerSettings("saeuron_scale", -5.0, error="legacy_saeuron"))
    f = np64(codes)
    # published: decode(f') + (decode(f) - x)
    ref = ref_decode(sae, ref_scaled(codes, -5.0)) + (ref_decode(sae, f) - np64(x))
    torch.testing.assert_close(r.values.double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)
    # ... which moves even untouched patches by -2 (x - x_hat)
    off = ~region
    moved = np64(r.values[off]) - np64(x[off])
    torch.testing.assert_close(torch.from_numpy(moved), torch.from_numpy(-2 * (np64(x[off]) - ref_decode(sae, f[np64(off) > 0]))),
                               rtol=1e-5, atol=1e-5)
    assert r.changed.all()


def test_error_none_is_the_pure_reconstruction():
    sae, u, x, codes, norm, step, mask, region = setup(5, 7)
    r = steer(sae, x, codes, norm, step, mask, SteerSettings("saeuron_scale", -2.0, error="none"))
    torch.testing.assert_close(r.values.double(), torch.from_numpy(ref_decode(sae, ref_scaled(codes, -2.0))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("error", ["legacy_saeuron", "none"])
def test_detected_only_keeps_the_rest_bit_identical(error):
    sae, u, x, codes, norm, step, mask, region = setup(6, 4)
    r = steer(sae, x, codes, norm, step, mask, SteerSettings("saeuron_scale", -3.0, error=error, detected_only=True))
    assert torch.equal(r.values[~region], x[~region])
    assert not torch.equal(r.values[region], x[region])


@pytest.mark.parametrize("detected_only", [False, True])
def test_set_to_value(detected_only):
    sae, u, x, codes, norm, step, mask, region = setup(5, 7)
    r = steer(sae, x, codes, norm, step, mask, SteerSettings("set", 0.0, detected_only=detected_only))
    f = np64(codes)
    f2 = f.copy()
    f2[..., 0] = 0.0
    ref = np64(x) + ref_decode(sae, f2) - ref_decode(sae, f)
    torch.testing.assert_close(r.values.double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)
    assert (r.values[region] @ u).abs().max() < 1e-4  # the planted component is gone
    already = codes[..., 0] == 0  # rounding leaves tiny positive codes on some background patches
    assert already.sum() > 0 and torch.equal(r.values[already], x[already])
    assert torch.equal(r.changed, ~already if not detected_only else region & ~already)


@pytest.mark.parametrize("detected_only", [False, True])
@pytest.mark.parametrize("use_sae_mean", [True, False])
def test_unbox_add(detected_only, use_sae_mean):
    sae, u, x, codes, norm, step, mask, region = setup(5, 7, latent_mean=use_sae_mean)
    r = steer(sae, x, codes, norm, step, mask, SteerSettings("unbox_add", 2.5, detected_only=detected_only))
    mean0 = float(sae.latent_mean[0]) if use_sae_mean else MU0
    where = np64(region)[..., None] if detected_only else 1.0
    ref = np64(x) + where * 2.5 * mean0 * np64(u)
    torch.testing.assert_close(r.values.double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)
    if detected_only:
        assert torch.equal(r.values[~region], x[~region])


def test_gsae_add():
    sae, u, x, codes, norm, step, mask, region = setup(4, 6)
    with torch.no_grad():
        sae.W_dec[0] *= 3.0  # G-SAE divides by ||d_j||: a non-unit decoder row must not matter
    r = steer(sae, x, codes, norm, step, mask, SteerSettings("gsae_add", 0.4))
    xn = np64(x)
    ref = xn + 0.4 * np.linalg.norm(xn, axis=-1, keepdims=True) * np64(u)
    torch.testing.assert_close(r.values.double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,msg", [
    ({"method": "ablate"}, "method is 'ablate'"),
    ({"error": "fixed"}, "error is 'fixed'"),
    ({"strength": float("inf")}, "strength is inf"),
])
def test_settings_reject(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SteerSettings(**kwargs)


def test_shape_mismatch_is_rejected():
    sae, u, x, codes, norm, step, mask, region = setup(4, 6)
    with pytest.raises(ValueError, match="must share leading dims"):
        steer(sae, x, codes, norm, step, mask[:, :3], SteerSettings())


@pytest.mark.parametrize("normalization", ["layer_norm", "constant_norm_rescale"])
@pytest.mark.parametrize("error", ["preserve", "legacy_saeuron", "none"])
def test_normalised_sae_matches_full_decodes(normalization, error):
    # the sparse decode difference must equal the SAE's own two full decodes, normalisation undone
    sae, u = planted_sae(normalization=normalization, seed=2)
    x = rearrange(planted_maps(2, 5, 6, u).block_out, "b c h w -> b h w c")
    codes, norm = sae.encode_with_norm(x)
    step = ConceptDictionary.from_latents([0, 3, 7], sae.cfg.n_latents, threshold=0.0, means=[0.5, 1.0, 2.0]).at(0.0)
    r = steer(sae, x, codes, norm, step, codes[..., 0] > 0, SteerSettings("saeuron_scale", -4.0, error=error))
    f2 = codes.clone()
    for i, mu in zip([0, 3, 7], [0.5, 1.0, 2.0], strict=True):
        f2[..., i] = torch.where(codes[..., i] > 0, codes[..., i] * (-4.0 * mu), codes[..., i])
    assert not torch.equal(f2, codes)
    d2, d1 = sae.decode(f2, norm), sae.decode(codes, norm)
    ref = {"preserve": x + (d2 - d1), "legacy_saeuron": d2 + (d1 - x), "none": d2}[error]
    if error == "preserve":
        keep = (f2 == codes).all(-1)
        ref = torch.where(keep[..., None], x, ref)
    torch.testing.assert_close(r.values, ref, rtol=1e-5, atol=1e-5)
