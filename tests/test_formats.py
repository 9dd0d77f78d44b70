"""Every checkpoint format, written in its real layout, loads and computes exactly what its original computes."""

import json
from dataclasses import dataclass

import pytest
import torch
from sae_builders import (
    positives_below_k,
    random_weights,
    reference_forward,
    varied_input,
    write_saelens,
    write_sparsify,
    write_unbox,
)
from safetensors.torch import save_file

from sae_core import (
    SAEConfigError,
    SAEFormatError,
    SAENonFiniteError,
    SAEShapeError,
    UnsafeCheckpointError,
    detect_format,
    load_sae,
    save_native,
)
from sae_core.blocks import BlockMismatchError, UnknownBlockError

D, M, K = 16, 64, 6
LEADING = [(3, 5, 7), (1, 2, 1), (6,)]  # non-square maps, a batch that is not a CFG pair, flat rows


def _assert_matches_reference(sae, x, **ref_kwargs):
    codes_ref, recon_ref = reference_forward(x, ref_kwargs.pop("w"), **ref_kwargs)
    out = sae(x)
    torch.testing.assert_close(out.codes.double(), torch.from_numpy(codes_ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.x_hat.double(), torch.from_numpy(recon_ref), atol=1e-5, rtol=1e-5)


# -- each format against the reference ----------------------------------------------------------


@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("saeuron", [False, True])
def test_sparsify_and_saeuron_match_reference(tmp_path, leading, saeuron):
    w = random_weights(D, M)
    x = varied_input((*leading, D))
    sae = load_sae(write_sparsify(tmp_path / "unet.up_blocks.1.attentions.1", w, k=K, saeuron=saeuron))
    assert sae.cfg.activation == "relu_topk" and sae.cfg.input_space == "output" and sae.cfg.k == K
    _assert_matches_reference(sae, x, w=w, activation="relu_topk", k=K)


def test_reference_data_has_rows_with_fewer_than_k_positives():
    w = random_weights(D, M)
    assert positives_below_k(varied_input((3, 5, 7, D)), w, K) > 0


def test_sparsify_groupmax(tmp_path):
    w = random_weights(D, M)
    x = varied_input((4, 3, D))
    sae = load_sae(write_sparsify(tmp_path / "sae", w, k=8, activation="groupmax"))
    assert sae.cfg.activation == "groupmax"
    _assert_matches_reference(sae, x, w=w, activation="groupmax", k=8)
    assert int((sae.encode(x) != 0).sum(-1).max()) <= 8


def test_expansion_factor_when_num_latents_is_zero(tmp_path):
    w = random_weights(D, 4 * D)
    sae = load_sae(write_sparsify(tmp_path / "sae", w, k=K, num_latents=0, expansion_factor=4))
    assert sae.cfg.n_latents == 4 * D


def test_gsae_needs_sigmoid_override(tmp_path):
    w = random_weights(D, M)
    x = varied_input((2, 3, D))
    path = write_sparsify(tmp_path / "gsae", w, k=K)
    sae = load_sae(path, activation="sigmoid_topk")
    _assert_matches_reference(sae, x, w=w, activation="sigmoid_topk", k=K)
    # Sigmoid(TopK) is genuinely different from ReLU-TopK: kept negatives become positive.
    assert not torch.allclose(sae.encode(x), load_sae(path).encode(x))
    assert sae.cfg.provenance["overrides"] == {"activation": "sigmoid_topk"}


@pytest.mark.parametrize(
    "architecture,legacy",
    [("standard", False), ("topk", False), ("jumprelu", False), ("standard", True), ("topk", True)],
)
def test_saelens_architectures(tmp_path, architecture, legacy):
    w = random_weights(D, M)
    x = varied_input((3, 2, 5, D))
    threshold = torch.rand(M) * 0.3 if architecture == "jumprelu" else None
    path = write_saelens(tmp_path / "lens", w, architecture=architecture, k=K if architecture == "topk" else None,
                         legacy=legacy, threshold=threshold)
    sae = load_sae(path)
    act = {"standard": "relu", "topk": "topk_relu", "jumprelu": "jumprelu"}[architecture]
    assert sae.cfg.activation == act and sae.cfg.hook_point == "unet.up_blocks.1.attentions.1"
    _assert_matches_reference(sae, x, w=w, activation=act, k=K if architecture == "topk" else None,
                              threshold=threshold)


def test_saelens_jumprelu_log_threshold(tmp_path):
    w = random_weights(D, M)
    threshold = torch.rand(M) * 0.3 + 0.01
    sae = load_sae(write_saelens(tmp_path / "j", w, architecture="jumprelu", threshold=threshold, log_threshold=True))
    x = varied_input((5, D))
    _assert_matches_reference(sae, x, w=w, activation="jumprelu", threshold=threshold)


@pytest.mark.parametrize("normalize", ["layer_norm", "constant_norm_rescale"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_normalisations_are_undone_after_decode(tmp_path, normalize, apply_b_dec):
    w = random_weights(D, M)
    x = varied_input((4, 3, D)) * 5 + 2
    sae = load_sae(write_saelens(tmp_path / "n", w, architecture="topk", k=K, normalize=normalize,
                                 apply_b_dec_to_input=apply_b_dec))
    _assert_matches_reference(sae, x, w=w, activation="topk_relu", k=K, normalize=normalize, apply_b_dec=apply_b_dec)


def test_saelens_expected_average_only_in_folds_the_scaling_factor(tmp_path):
    w = random_weights(D, M)
    s = 3.5
    x = varied_input((6, D))
    sae = load_sae(write_saelens(tmp_path / "e", w, architecture="standard", normalize="expected_average_only_in",
                                 norm_scaling_factor=s))
    codes_ref, recon_ref = reference_forward(x * s, w, activation="relu")  # SAE(x * s) / s, unfolded
    torch.testing.assert_close(sae.encode(x).double(), torch.from_numpy(codes_ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x).x_hat.double(), torch.from_numpy(recon_ref) / s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("openai_extras", [False, True])
def test_unbox_matches_reference_and_keeps_stats(tmp_path, openai_extras):
    w = random_weights(D, M)
    x = varied_input((2, 4, 3, D))
    d = tmp_path / "unet.up_blocks.0.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001" / "final"
    sae = load_sae(write_unbox(d, w, k=K, openai_extras=openai_extras))
    assert sae.cfg.activation == "topk_relu" and sae.cfg.input_space == "residual"
    # a width that fits no SD block: the recorded hook is kept as found, no family is guessed
    assert sae.cfg.hook_point == "unet.up_blocks.0.attentions.1" and sae.cfg.model_family is None
    assert sae.latent_mean.shape == (M,) and sae.latent_std.device.type == "cpu"
    torch.testing.assert_close(sae.latent_mean, torch.load(d / "mean.pt"))
    _assert_matches_reference(sae, x, w=w, activation="topk_relu", k=K)


def test_hook_point_is_canonicalised_and_family_inferred_from_width(tmp_path):
    w = random_weights(1280, 32)
    d = tmp_path / "unet.up_blocks.0.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001" / "final"
    sae = load_sae(write_unbox(d, w, k=4))
    assert (sae.cfg.hook_point, sae.cfg.model_family) == ("up_blocks.0.attentions.1", "sdxl")
    w = random_weights(1280, 32)
    sae = load_sae(write_sparsify(tmp_path / "unet.up_blocks.1.attentions.2", w, k=4))
    assert (sae.cfg.hook_point, sae.cfg.model_family) == ("up_blocks.1.attentions.2", "sd1")  # 1280 wide: SD 1.x
    sae = load_sae(tmp_path / "unet.up_blocks.1.attentions.2", hook_point="output_blocks.3.1")
    assert (sae.cfg.hook_point, sae.cfg.model_family) == ("up_blocks.1.attentions.0", "sd1")


def test_overridden_hook_or_family_must_fit_the_width(tmp_path):
    d = write_sparsify(tmp_path / "unet.up_blocks.1.attentions.1", random_weights(1280, 32), k=4)
    with pytest.raises(BlockMismatchError, match=r"d_in=1280 does not fit block up_blocks.1.attentions.1.*sdxl.*640"):
        load_sae(d, model_family="sdxl")
    with pytest.raises(BlockMismatchError, match=r"d_in=1280 does not fit block up_blocks.2.attentions.0"):
        load_sae(d, hook_point="up.2.0", model_family="sd1")
    with pytest.raises(UnknownBlockError, match=r"unknown block 'blocks.5.hook_resid_post'"):
        load_sae(d, hook_point="blocks.5.hook_resid_post")


def test_openai_layer_norm_inputs(tmp_path):
    w = random_weights(D, M)
    x = varied_input((3, 5, D)) * 4 - 1
    sae = load_sae(write_unbox(tmp_path / "oa", w, k=K, normalize=True, stats=False))
    assert sae.cfg.normalization == "layer_norm" and sae.latent_mean is None
    _assert_matches_reference(sae, x, w=w, activation="topk_relu", k=K, normalize="layer_norm")


def test_relu_topk_and_topk_relu_give_the_same_dense_codes(tmp_path):
    w = random_weights(D, M)
    x = varied_input((3, 5, 7, D))
    a = load_sae(write_sparsify(tmp_path / "a", w, k=K))
    b = load_sae(write_sparsify(tmp_path / "a", w, k=K), activation="topk_relu")
    torch.testing.assert_close(a.encode(x), b.encode(x), atol=0, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
def test_half_precision_follows_the_reference(tmp_path, dtype, tol):
    w = random_weights(D, M)
    x = varied_input((3, 5, D))
    sae = load_sae(write_sparsify(tmp_path / "h", w, k=K))
    out = sae(x.to(dtype))
    assert out.codes.dtype == dtype and out.x_hat.dtype == dtype
    # reference on the same rounded inputs and weights, in float64
    wr = {n: t.to(dtype).double() for n, t in w.items()}
    codes_ref, recon_ref = reference_forward(x.to(dtype), wr, activation="relu_topk", k=K)
    torch.testing.assert_close(out.codes.double(), torch.from_numpy(codes_ref), atol=tol, rtol=tol)
    torch.testing.assert_close(out.x_hat.double(), torch.from_numpy(recon_ref), atol=tol, rtol=tol)


# -- native round trips ---------------------------------------------------------------------------


def _all_formats(tmp_path):
    w = random_weights(D, M)
    yield "sparsify", write_sparsify(tmp_path / "s", w, k=K, saeuron=True), {}
    yield "gsae", write_sparsify(tmp_path / "g", w, k=K), {"activation": "sigmoid_topk", "input_space": "residual"}
    yield "saelens-jumprelu", write_saelens(tmp_path / "j", w, architecture="jumprelu", threshold=torch.rand(M) * 0.2), {}
    yield "saelens-ln", write_saelens(tmp_path / "l", w, architecture="topk", k=K, normalize="layer_norm"), {}
    yield "unbox", write_unbox(tmp_path / "u", w, k=K), {"input_space": "output"}


def test_every_format_round_trips_through_native(tmp_path):
    x = varied_input((2, 3, 5, D))
    for name, path, overrides in _all_formats(tmp_path):
        sae = load_sae(path, **overrides)
        out = save_native(sae, tmp_path / f"{name}.safetensors")
        assert detect_format(out)[0] == "native"
        back = load_sae(out)
        assert back.cfg == sae.cfg, name
        torch.testing.assert_close(back.encode(x), sae.encode(x), atol=0, rtol=0)
        torch.testing.assert_close(back(x).x_hat, sae(x).x_hat, atol=0, rtol=0)
        assert back.fingerprint() == sae.fingerprint()
        if sae.latent_mean is not None:
            torch.testing.assert_close(back.latent_mean, sae.latent_mean)


def test_fingerprint_changes_with_weights(tmp_path):
    w = random_weights(D, M)
    a = load_sae(write_sparsify(tmp_path / "a", w, k=K))
    w2 = dict(w, b_dec=w["b_dec"] + 1e-3)
    b = load_sae(write_sparsify(tmp_path / "b", w2, k=K))
    assert a.fingerprint() != b.fingerprint()


def test_checkpoint_found_one_level_down_and_ambiguity_is_an_error(tmp_path):
    w = random_weights(D, M)
    write_sparsify(tmp_path / "run" / "unet.up_blocks.1.attentions.1", w, k=K)
    assert load_sae(tmp_path / "run").cfg.hook_point == "unet.up_blocks.1.attentions.1"
    write_sparsify(tmp_path / "run" / "unet.up_blocks.1.attentions.2", w, k=K)
    with pytest.raises(SAEFormatError, match="holds 2 SAE checkpoints.*pass one of them"):
        load_sae(tmp_path / "run")


def test_weights_file_path_is_accepted(tmp_path):
    w = random_weights(D, M)
    d = write_saelens(tmp_path / "lens", w)
    assert detect_format(d / "sae_weights.safetensors") == ("saelens", d)


# -- bad input: specific errors naming file/key, expected and found --------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(SAEFormatError, match=r"nope: no such file or directory"):
        load_sae(tmp_path / "nope")


def test_missing_weights_file(tmp_path):
    d = write_sparsify(tmp_path / "s", random_weights(D, M), k=K)
    (d / "sae.safetensors").unlink()
    with pytest.raises(SAEFormatError, match=r"cfg\.json: found the config but the weights are missing; expected sae\.safetensors"):
        load_sae(d)


def test_unrecognised_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(SAEFormatError, match=r"unrecognised layout.*cfg\.json \+ sae\.safetensors.*readme\.txt"):
        load_sae(tmp_path)


def test_wrong_tensor_shape(tmp_path):
    w = random_weights(D, M)
    w["W_dec"] = w["W_dec"][:, :-1].contiguous()
    with pytest.raises(SAEShapeError, match=r"'W_dec' has shape \(64, 15\), expected \(64, 16\)"):
        load_sae(write_sparsify(tmp_path / "s", w, k=K))


def test_config_weight_width_mismatch(tmp_path):
    d = write_sparsify(tmp_path / "s", random_weights(D, M), k=K)
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["d_in"] = 1280
    (d / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match=r"cfg\.json: config says d_in=1280 but tensor 'encoder.weight' has 16"):
        load_sae(d)


def test_unbox_config_weight_mismatch(tmp_path):
    d = write_unbox(tmp_path / "u", random_weights(D, M), k=K)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_dirs_local"] = 5120
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match=r"n_dirs_local=5120 but tensor 'encoder.weight \(dim 0\)' has 64"):
        load_sae(d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, bad):
    w = random_weights(D, M)
    w["W_enc"][3, 4] = bad
    with pytest.raises(SAENonFiniteError, match=r"'W_enc' holds 1 NaN/inf"):
        load_sae(write_sparsify(tmp_path / "s", w, k=K))


@dataclass
class _Payload:  # not a tensor: weights_only loading must refuse it
    note: str = "x"


def test_pth_with_non_tensor_objects_is_refused(tmp_path):
    d = write_unbox(tmp_path / "u", random_weights(D, M), k=K)
    blob = torch.load(d / "state_dict.pth", weights_only=True)
    blob["extra"] = _Payload()
    torch.save(blob, d / "state_dict.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"state_dict\.pth: holds objects other than tensors"):
        load_sae(d)


def test_truncated_safetensors(tmp_path):
    d = write_sparsify(tmp_path / "s", random_weights(D, M), k=K)
    data = (d / "sae.safetensors").read_bytes()
    (d / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match=r"sae\.safetensors: not a readable safetensors file.*truncated"):
        load_sae(d)


def test_truncated_native_file(tmp_path):
    sae = load_sae(write_sparsify(tmp_path / "s", random_weights(D, M), k=K))
    p = save_native(sae, tmp_path / "x.safetensors")
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(SAEFormatError, match="truncated"):
        load_sae(p)


def test_foreign_safetensors_file_is_not_native(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(SAEFormatError, match=r"without this pack's metadata.*convert"):
        load_sae(tmp_path / "model.safetensors")


def test_saeuron_input_unit_norm_is_refused(tmp_path):
    d = write_sparsify(tmp_path / "s", random_weights(D, M), k=K, saeuron=True, input_unit_norm=True)
    with pytest.raises(SAEFormatError, match=r"cfg\.json: input_unit_norm is true; expected false"):
        load_sae(d)


def test_override_that_contradicts_the_weights(tmp_path):
    d = write_sparsify(tmp_path / "s", random_weights(D, M), k=K)
    with pytest.raises(SAEShapeError, match=r"'jumprelu' needs a 'threshold'.*overrides.*contradict the weights"):
        load_sae(d, activation="jumprelu")


def test_unknown_override_and_bad_values(tmp_path):
    d = write_sparsify(tmp_path / "s", random_weights(D, M), k=K)
    with pytest.raises(SAEConfigError, match=r"unknown overrides \['colour'\]"):
        load_sae(d, colour="red")
    with pytest.raises(SAEConfigError, match=r"input_space='latent'"):
        load_sae(d, input_space="latent")
    with pytest.raises(SAEConfigError, match=r"groupmax.*divisible"):
        load_sae(d, activation="groupmax", k=7)


def test_unsupported_saelens_architecture(tmp_path):
    d = write_saelens(tmp_path / "g", random_weights(D, M), architecture="gated")
    with pytest.raises(SAEFormatError, match=r"architecture 'gated' is not supported"):
        load_sae(d)


def test_input_of_wrong_width(tmp_path):
    sae = load_sae(write_sparsify(tmp_path / "s", random_weights(D, M), k=K))
    with pytest.raises(SAEShapeError, match=r"input has width 15.*expected d_in=16"):
        sae.encode(torch.zeros(2, 15))
