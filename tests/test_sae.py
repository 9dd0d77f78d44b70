"""SparseAutoencoder and SAEConfig behaviour beyond the formats: casting cache, TopK path, identity, validation."""

import pytest
import torch
from sae_builders import random_weights, reference_forward, varied_input

from sae_core import SAEConfig, SAEConfigError, SparseAutoencoder

D, M, K = 16, 64, 6


def _sae(activation="relu_topk", k=K, **cfg):
    w = random_weights(D, M)
    extra = {"threshold": torch.rand(M) * 0.2} if activation == "jumprelu" else {}
    return SparseAutoencoder(SAEConfig(d_in=D, n_latents=M, k=k, activation=activation, **cfg), **w, **extra), w


@pytest.mark.parametrize("activation", ["relu_topk", "topk_relu", "sigmoid_topk", "groupmax"])
def test_topk_path_equals_dense_path(activation):
    sae, _ = _sae(activation, k=8)
    x = varied_input((2, 5, 3, D))
    dense = sae.encode(x)
    kept = sae.encode_topk(x)
    assert kept.values.shape == (2, 5, 3, 8)
    rebuilt = torch.zeros_like(dense).scatter_(-1, kept.indices, kept.values)
    torch.testing.assert_close(rebuilt, dense, atol=0, rtol=0)
    torch.testing.assert_close(sae.decode_topk(kept.values, kept.indices), sae.decode(dense), atol=1e-5, rtol=1e-5)


def test_topk_path_refused_for_relu():
    sae, _ = _sae("relu", k=None)
    with pytest.raises(ValueError, match="TopK-style"):
        sae.encode_topk(torch.zeros(1, D))


def test_layer_norm_state_round_trip():
    sae, w = _sae("topk_relu", normalization="layer_norm")
    x = varied_input((4, D)) * 3 + 1
    codes, norm = sae.encode_with_norm(x)
    assert norm is not None
    _, recon = reference_forward(x, w, activation="topk_relu", k=K, normalize="layer_norm")
    torch.testing.assert_close(sae.decode(codes, norm).double(), torch.from_numpy(recon), atol=1e-5, rtol=1e-5)
    # without the state, decode stays in the normalised space
    assert not torch.allclose(sae.decode(codes), sae.decode(codes, norm))


def test_weights_are_cast_once_per_dtype_and_recast_after_an_edit():
    sae, _ = _sae()
    a = sae.weights("cpu", torch.float16)
    assert a.W_enc.dtype == torch.float16
    assert sae.weights("cpu", torch.float16) is a  # cached
    assert sae.weights("cpu", torch.float32).W_enc is sae.W_enc  # own dtype: no copy
    with torch.no_grad():
        sae.W_enc[0, 0] += 1.0
    b = sae.weights("cpu", torch.float16)
    assert b is not a and b.W_enc[0, 0] == sae.W_enc[0, 0].half()


def test_to_dtype_drops_stale_casts():
    sae, _ = _sae()
    sae.weights("cpu", torch.bfloat16)
    sae.to(torch.float64)
    assert sae.W_enc.dtype == torch.float64 and not sae._cache


def test_fingerprint_is_stable_and_tracks_edits():
    sae, w = _sae()
    again = SparseAutoencoder(sae.cfg, **w)
    assert sae.fingerprint() == again.fingerprint()
    with torch.no_grad():
        again.W_dec[1] *= 2
    assert sae.fingerprint() != again.fingerprint()


def test_codes_keep_input_dtype_and_k():
    sae, _ = _sae()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        codes = sae.encode(varied_input((3, 7, D)).to(dtype))
        assert codes.dtype == dtype
        assert int((codes != 0).sum(-1).max()) <= K


def test_config_dict_round_trip_and_validation():
    cfg = SAEConfig(d_in=D, n_latents=M, k=K, activation="topk_relu", input_space="residual",
                    hook_point="up_blocks.0.attentions.1", model_family="sdxl", provenance={"a": 1})
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    bad = [
        (dict(d_in=0), r"d_in: expected a positive integer, found 0"),
        (dict(activation="softmax"), r"activation: expected one of .* found 'softmax'"),
        (dict(k=None), r"k: activation 'relu_topk' needs an integer k in 1..64, found None"),
        (dict(k=65), r"found 65"),
        (dict(activation="relu"), r"keeps no top k, so k must be None"),
        (dict(input_space="latent"), r"input_space"),
        (dict(model_family="sd2"), r"model_family"),
        (dict(normalization="batch"), r"normalization"),
    ]
    for change, msg in bad:
        with pytest.raises(SAEConfigError, match=msg):
            SAEConfig(**{**dict(d_in=D, n_latents=M, k=K), **change})
    with pytest.raises(SAEConfigError, match=r"unknown keys \['colour'\]"):
        SAEConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_skip_connection_applies_to_raw_input():
    w = random_weights(D, M)
    skip = torch.randn(D, D) * 0.1
    cfg = SAEConfig(d_in=D, n_latents=M, k=K)
    plain = SparseAutoencoder(cfg, **w)
    skipped = SparseAutoencoder(cfg, **w, W_skip=skip)
    x = varied_input((5, D))
    torch.testing.assert_close(skipped(x).x_hat, plain(x).x_hat + x @ skip.T)


def test_sae_built_under_inference_mode_works_like_comfyui_builds_it():
    w = random_weights(D, M)
    x = varied_input((3, 5, D))
    plain = SparseAutoencoder(SAEConfig(d_in=D, n_latents=M, k=K), **w)
    with torch.inference_mode():  # ComfyUI executes every node under inference mode
        sae = SparseAutoencoder(SAEConfig(d_in=D, n_latents=M, k=K), **w)
        assert sae.W_enc.is_inference()
        assert sae.fingerprint() == plain.fingerprint()
        half = sae.weights("cpu", torch.float16)
        assert sae.weights("cpu", torch.float16) is half
        torch.testing.assert_close(sae.encode(x), plain.encode(x), atol=0, rtol=0)
