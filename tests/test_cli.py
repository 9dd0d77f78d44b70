"""`python -m sae_core` inspect / convert / blocks on checkpoints written here in their real layouts."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_builders import random_weights, varied_input, write_saelens, write_sparsify, write_unbox
from safetensors.torch import load_file, save_file

from sae_core import load_sae, save_native
from sae_core.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
D_BLOCK, M = 1280, 64  # real block width, few latents: a small file that fits a real hook point
K = 6


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def inspect_json(*argv):
    code, out, err = run("inspect", "--json", *argv)
    return code, json.loads(out), err


def _expected_norms(W_dec):
    n = torch.linalg.vector_norm(W_dec.double(), dim=1)
    return float(n.min()), float(n.mean()), float(n.max())


# -- inspect ------------------------------------------------------------------------------------


def test_inspect_saeuron_directory(tmp_path):
    w = random_weights(D_BLOCK, M)
    ckpt = write_sparsify(tmp_path / "unet.up_blocks.1.attentions.2", w, k=K, saeuron=True)
    code, r, err = inspect_json(ckpt)
    assert code == 0 and err == ""
    assert r["format"] == "sparsify"
    assert r["config"]["d_in"] == D_BLOCK and r["config"]["n_latents"] == M and r["config"]["k"] == K
    assert r["config"]["activation"] == "relu_topk" and r["config"]["input_space"] == "output"
    # SAeUron styles block: SD1 output_blocks.5.1, 1280 channels, 16x16 at 512, 32x32 at 1024
    assert r["family"] == "sd1"
    assert r["block"]["diffusers"] == "up_blocks.1.attentions.2"
    assert r["block"]["comfy_key"] == "diffusion_model.output_blocks.5.1"
    assert r["block"]["grids"] == {"512x512": [16, 16], "1024x1024": [32, 32]}
    shapes = {t["name"]: (t["shape"], t["dtype"]) for t in r["tensors"]}
    assert shapes == {
        "W_enc": ([M, D_BLOCK], "float32"),
        "b_enc": ([M], "float32"),
        "W_dec": ([M, D_BLOCK], "float32"),
        "b_dec": ([D_BLOCK], "float32"),
    }
    assert sorted(f["name"] for f in r["files"]) == ["cfg.json", "sae.safetensors"]
    lo, mean, hi = _expected_norms(w["W_dec"])
    assert r["decoder_row_norm"] == pytest.approx({"min": lo, "mean": mean, "max": hi}, abs=1e-6)
    assert r["unit_norm_expected"] == "normalize_decoder"
    assert r["dead_latents"]["zero_decoder_rows"] == 0 and r["non_finite"] == {} and r["errors"] == []
    # M < d_in in this tiny fixture: reported, not fatal
    assert any("not an overcomplete SAE" in x for x in r["warnings"])


def test_inspect_text_output_names_the_essentials(tmp_path):
    ckpt = write_sparsify(tmp_path / "unet.up_blocks.1.attentions.1", random_weights(D_BLOCK, M), k=K)
    code, out, _ = run("inspect", ckpt)
    assert code == 0
    assert "format        sparsify" in out
    assert "up_blocks.1.attentions.1 = diffusion_model.output_blocks.4.1" in out
    assert "family        sd1" in out
    assert "W_dec       [64, 1280]" in out
    assert "non-finite    none" in out


def test_inspect_unbox_reports_stats_dead_rows_and_family(tmp_path):
    w = random_weights(D_BLOCK, M)
    w["W_dec"][[3, 7, 9]] = 0.0
    ckpt = write_unbox(
        tmp_path / "unet.up_blocks.0.attentions.0_k10_hidden5120_auxk256_bs4096_lr0.0001" / "final", w, k=K
    )
    code, r, _ = inspect_json(ckpt.parent)
    assert code == 0
    assert r["format"] == "unbox" and r["config"]["input_space"] == "residual"
    assert r["family"] == "sdxl" and r["block"]["comfy_key"] == "diffusion_model.output_blocks.0.1"
    assert r["dead_latents"]["zero_decoder_rows"] == 3 and r["dead_latents"]["first_ids"] == [3, 7, 9]
    assert any("all-zero decoder row" in x and "[3, 7, 9]" in x for x in r["warnings"])
    mean = torch.load(ckpt / "mean.pt")
    assert r["latent_mean"] == pytest.approx(
        {"min": float(mean.min()), "mean": float(mean.double().mean()), "max": float(mean.max())}, rel=1e-6
    )
    assert r["decoder_row_norm"]["min"] == 0.0


def test_inspect_warns_on_non_unit_decoder_rows_when_the_config_promises_them(tmp_path):
    w = random_weights(D_BLOCK, M)
    w["W_dec"][5] *= 1.5
    w["W_dec"][11] *= 0.5
    ckpt = write_sparsify(tmp_path / "unet.up_blocks.1.attentions.1", w, k=K)  # normalize_decoder: true
    code, r, _ = inspect_json(ckpt)
    assert code == 0
    msg = [x for x in r["warnings"] if "not unit norm" in x]
    assert len(msg) == 1 and "2 of 64 decoder rows" in msg[0] and "row 5 has norm 1.5" in msg[0]
    assert "normalize_decoder=true" in msg[0]
    assert r["decoder_row_norm"]["max"] == pytest.approx(1.5, abs=1e-6)
    code, _, _ = run("inspect", "--strict", ckpt)
    assert code == 1


def test_inspect_does_not_expect_unit_norm_without_the_flag(tmp_path):
    w = random_weights(D_BLOCK, M)
    w["W_dec"][5] *= 1.5
    ckpt = write_saelens(tmp_path / "lens", w, hook="unet.up_blocks.1.attentions.1")
    code, r, _ = inspect_json(ckpt)
    assert code == 0 and r["unit_norm_expected"] is None
    assert not any("not unit norm" in x for x in r["warnings"])


@pytest.mark.parametrize("tensor", ["W_enc", "W_dec", "b_dec"])
def test_inspect_counts_non_finite_values_and_fails(tmp_path, tensor):
    w = random_weights(D_BLOCK, M)
    flat = w[tensor].view(-1)
    flat[0], flat[2] = float("nan"), float("inf")
    ckpt = write_sparsify(tmp_path / "unet.up_blocks.1.attentions.1", w, k=K)
    code, r, _ = inspect_json(ckpt)
    assert code == 1
    assert r["non_finite"] == {tensor: 2}
    assert any(f"tensor {tensor!r} holds 2 NaN/inf" in e for e in r["errors"])


def test_inspect_width_not_matching_the_hook_point_is_an_error(tmp_path):
    ckpt = write_sparsify(tmp_path / "unet.up_blocks.1.attentions.1", random_weights(640, M), k=K)
    code, r, _ = inspect_json(ckpt, "--family", "sd1")
    assert code == 1
    (msg,) = r["errors"]
    assert str(ckpt) in msg and "d_in=640" in msg and "1280 channels" in msg
    assert "up_blocks.2.attentions.0 (output_blocks.6.1)" in msg  # an SD1 block with 640 channels
    # without a family the 640 channels pick SDXL, where this block has 640 channels
    code, r, _ = inspect_json(ckpt)
    assert (
        code == 0 and r["family"] == "sdxl" and r["block"]["comfy_key"] == "diffusion_model.output_blocks.4.1"
    )


def test_inspect_against_another_hook(tmp_path):
    ckpt = write_sparsify(tmp_path / "sae", random_weights(D_BLOCK, M), k=K)
    code, r, _ = inspect_json(ckpt)
    assert code == 0 and r["block"] is None and any("no hook point recorded" in x for x in r["warnings"])
    code, r, _ = inspect_json(ckpt, "--hook", "down.2.1", "--family", "SDXL-Turbo")
    assert (
        code == 0 and r["block"]["comfy_key"] == "diffusion_model.input_blocks.8.1" and r["family"] == "sdxl"
    )


def test_inspect_ambiguous_family_is_a_warning(tmp_path):
    ckpt = write_sparsify(tmp_path / "unet.mid_block.attentions.0", random_weights(D_BLOCK, M), k=K)
    code, r, _ = inspect_json(ckpt)
    assert (
        code == 0
        and r["family"] is None
        and r["block"] == {"diffusers": "mid_block.attentions.0", "family": None}
    )
    assert any("several model families" in x and "--family" in x for x in r["warnings"])
    code, r, _ = inspect_json(ckpt, "--family", "sd1")
    assert r["block"]["grids"]["512x512"] == [8, 8]  # SD1 middle block is at 1/8


def test_inspect_jumprelu_threshold_stats_and_negative_warning(tmp_path):
    w = random_weights(D_BLOCK, M)
    threshold = torch.rand(M) * 0.2
    threshold[:4] = -0.1
    ckpt = write_saelens(
        tmp_path / "jr", w, architecture="jumprelu", threshold=threshold, hook="up_blocks.1.attentions.1"
    )
    code, r, _ = inspect_json(ckpt)
    assert code == 0
    assert r["threshold"]["min"] == pytest.approx(-0.1) and r["threshold"]["max"] == pytest.approx(
        float(threshold.max())
    )
    assert any("4 JumpReLU thresholds are negative" in x for x in r["warnings"])


def test_inspect_shape_disagreement_is_an_error(tmp_path):
    w = random_weights(D_BLOCK, M)
    ckpt = write_sparsify(tmp_path / "unet.up_blocks.1.attentions.1", w, k=K)
    tensors = load_file(str(ckpt / "sae.safetensors"))
    tensors["encoder.bias"] = tensors["encoder.bias"][:-1]  # sparsify name of b_enc
    save_file(tensors, str(ckpt / "sae.safetensors"))
    code, r, _ = inspect_json(ckpt)
    assert code == 1 and any("'b_enc'" in e and f"({M},)" in e for e in r["errors"])


# -- errors are one line, no traceback ----------------------------------------------------------


@pytest.mark.parametrize(
    "argv_fn, needle",
    [
        (lambda p: ["inspect", p / "missing"], "no such file or directory"),
        (lambda p: ["inspect", p / "empty"], "unrecognised layout"),
        (lambda p: ["inspect", p / "empty", "--family", "sd2"], "unrecognised layout"),
        (lambda p: ["convert", p / "missing", p / "out.safetensors"], "no such file or directory"),
        (lambda p: ["blocks", "--family", "sd2"], "unknown model family 'sd2'"),
    ],
)
def test_errors_are_one_line_with_exit_code_1(tmp_path, argv_fn, needle):
    (tmp_path / "empty").mkdir()
    code, out, err = run(*argv_fn(tmp_path))
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err


def test_module_entry_point_runs_and_prints_no_traceback(tmp_path):
    ckpt = write_sparsify(tmp_path / "unet.up_blocks.1.attentions.1", random_weights(D_BLOCK, M), k=K)
    ok = subprocess.run(
        [sys.executable, "-m", "sae_core", "inspect", str(ckpt)], cwd=ROOT, capture_output=True, text=True
    )
    assert ok.returncode == 0 and "diffusion_model.output_blocks.4.1" in ok.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_core",
            "convert",
            str(ckpt),
            str(tmp_path / "x.safetensors"),
            "--hook",
            "up.0.1",
            "--family",
            "sd1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    assert "'up.0.1' is not a hookable block of sd1. It is a block of sdxl" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


# -- convert ------------------------------------------------------------------------------------


# non-square maps, and a batch of 3 that is no [uncond, cond] pair
@pytest.mark.parametrize("leading", [(2, 12, 16), (3, 5, 7)])
def test_convert_sparsify_to_native_is_exact(tmp_path, leading):
    w = random_weights(D_BLOCK, M)
    src = write_sparsify(tmp_path / "unet.up_blocks.1.attentions.1", w, k=K, saeuron=True)
    dst = tmp_path / "out" / "objects.safetensors"
    code, out, err = run("convert", src, dst)
    assert code == 0 and err == "" and str(dst) in out
    before, after = load_sae(src), load_sae(dst)
    assert after.cfg.hook_point == "up_blocks.1.attentions.1" and after.cfg.model_family == "sd1"
    assert after.cfg.source_format == "sparsify"
    assert after.cfg.provenance["converted_from"] == {"path": str(src), "format": "sparsify"}
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(after, name), w[name], atol=0, rtol=0)
    x = varied_input((*leading, D_BLOCK))
    ref, got = before(x), after(x)
    torch.testing.assert_close(got.codes, ref.codes, atol=0, rtol=0)
    torch.testing.assert_close(got.x_hat, ref.x_hat, atol=0, rtol=0)


def test_convert_records_hook_family_and_overrides(tmp_path):
    w = random_weights(D_BLOCK, M)
    src = write_sparsify(tmp_path / "gsae", w, k=K)
    dst = tmp_path / "gsae.safetensors"
    code, _, err = run(
        "convert",
        src,
        dst,
        "--hook",
        "output_blocks.1.1",
        "--family",
        "sdxl-turbo",
        "--activation",
        "sigmoid_topk",
        "--input-space",
        "residual",
        "--k",
        "3",
    )
    assert code == 0, err
    c = load_sae(dst).cfg
    assert (c.hook_point, c.model_family, c.activation, c.input_space, c.k) == (
        "up_blocks.0.attentions.1",
        "sdxl",
        "sigmoid_topk",
        "residual",
        3,
    )
    # the override changes the forward: Sigmoid of the kept top-3 raw pre-activations
    x = varied_input((2, 3, D_BLOCK))
    pre = (x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"]
    vals, idx = pre.topk(3, dim=-1)
    ref = torch.zeros_like(pre).scatter_(-1, idx, torch.sigmoid(vals))
    torch.testing.assert_close(load_sae(dst).encode(x), ref, atol=1e-5, rtol=1e-5)


def test_convert_unbox_keeps_stats_and_residual_space(tmp_path):
    w = random_weights(D_BLOCK, M)
    src = write_unbox(
        tmp_path / "unet.down_blocks.2.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001", w, k=K
    )
    dst = tmp_path / "down21.safetensors"
    assert run("convert", src, dst)[0] == 0
    sae = load_sae(dst)
    assert (sae.cfg.hook_point, sae.cfg.model_family, sae.cfg.input_space) == (
        "down_blocks.2.attentions.1",
        "sdxl",
        "residual",
    )
    torch.testing.assert_close(sae.latent_mean, torch.load(src / "mean.pt").float(), atol=0, rtol=0)
    torch.testing.assert_close(sae.W_dec, w["W_dec"], atol=0, rtol=0)


def test_convert_ambiguous_family_warns_and_leaves_it_unset(tmp_path):
    src = write_sparsify(tmp_path / "unet.mid_block.attentions.0", random_weights(D_BLOCK, M), k=K)
    dst = tmp_path / "mid.safetensors"
    code, _, err = run("convert", src, dst)
    assert code == 0 and err.startswith("warning: ") and "--family" in err
    c = load_sae(dst).cfg
    assert c.hook_point == "mid_block.attentions.0" and c.model_family is None


def test_convert_without_hook_warns(tmp_path):
    src = write_sparsify(tmp_path / "plain", random_weights(D_BLOCK, M), k=K)
    code, _, err = run("convert", src, tmp_path / "plain.safetensors")
    assert (
        code == 0
        and "no hook point" in err
        and load_sae(tmp_path / "plain.safetensors").cfg.hook_point is None
    )


def test_convert_refuses_a_hook_the_width_does_not_fit_and_writes_nothing(tmp_path):
    src = write_sparsify(tmp_path / "sae", random_weights(640, M), k=K)
    dst = tmp_path / "bad.safetensors"
    code, out, err = run("convert", src, dst, "--hook", "up.1.1", "--family", "sd1")
    assert code == 1 and out == "" and not dst.exists()
    assert "d_in=640" in err and "1280 channels" in err and "diffusion_model.output_blocks.4.1" in err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--hook", "up_blocks.1.attentions.1.transformer_blocks.0"], "sub-module"),
        (["--hook", "output_blocks.4.0"], "not a hookable block"),
        (["--family", "sd2"], "unknown model family 'sd2'"),
        (["--k", "0"], "--k 0: expected a positive integer"),
        # a wrong value is bad input like a bad file: one line, exit 1 (argparse's usage and exit 2 are for a
        # malformed command line only)
        (["--activation", "softmax"], "--activation 'softmax' is unknown; expected one of ['groupmax', "),
        (["--input-space", "middle"], "--input-space 'middle' is unknown; expected one of ['output', 'residual']"),
    ],
)
def test_convert_bad_options(tmp_path, extra, needle):
    src = write_sparsify(tmp_path / "sae", random_weights(D_BLOCK, M), k=K)
    dst = tmp_path / "x.safetensors"
    code, _, err = run("convert", src, dst, *extra)
    assert code == 1 and needle in err and err.count("\n") == 1 and not dst.exists()


def test_convert_destination_rules(tmp_path):
    src = write_sparsify(tmp_path / "unet.up_blocks.1.attentions.1", random_weights(D_BLOCK, M), k=K)
    code, _, err = run("convert", src, tmp_path / "x.pt")
    assert code == 1 and "must end in .safetensors" in err
    dst = tmp_path / "x.safetensors"
    dst.write_bytes(b"keep me")
    code, _, err = run("convert", src, dst)
    assert code == 1 and "already exists" in err and dst.read_bytes() == b"keep me"
    assert run("convert", src, dst, "--force")[0] == 0 and load_sae(dst).cfg.d_in == D_BLOCK


def test_convert_native_in_place_with_force(tmp_path):
    w = random_weights(D_BLOCK, M)
    sae = load_sae(write_sparsify(tmp_path / "s", w, k=K))
    p = save_native(sae, tmp_path / "n.safetensors")
    assert run("convert", p, p, "--force", "--hook", "up.1.1", "--family", "sd1")[0] == 0
    back = load_sae(p)
    assert back.cfg.hook_point == "up_blocks.1.attentions.1" and back.fingerprint() == sae.fingerprint()


# -- blocks -------------------------------------------------------------------------------------


def test_blocks_lists_both_tables(tmp_path):
    code, out, _ = run("blocks")
    assert code == 0
    assert "| up_blocks.1.attentions.1 | output_blocks.4.1 | up.1.1 | 1280 | 16x16 | 32x32 |" in out  # sd1
    assert "| up_blocks.1.attentions.1 | output_blocks.4.1 | up.1.1 | 640 | 32x32 | 64x64 |" in out  # sdxl
    assert "| mid_block.attentions.0 | middle_block.1 | mid.0 | 1280 | 8x8 | 16x16 |" in out
    code, out, _ = run("blocks", "--family", "sdxl")
    assert (
        "down_blocks.0" not in out
        and "| up_blocks.0.attentions.1 | output_blocks.1.1 | up.0.1 | 1280 |" in out
    )


def test_inspect_family_other_than_recorded_is_an_error(tmp_path):
    src = write_sparsify(tmp_path / "unet.mid_block.attentions.0", random_weights(D_BLOCK, M), k=K)
    dst = tmp_path / "mid.safetensors"
    assert run("convert", src, dst, "--family", "sdxl")[0] == 0
    # the middle block has 1280 channels in both families: only the recorded family can tell
    code, r, _ = inspect_json(dst, "--family", "sd1")
    assert code == 1 and any("model_family='sdxl'" in e and "'sd1' was asked" in e for e in r["errors"])
    assert inspect_json(dst, "--family", "sdxl")[0] == 0


def test_inspect_hook_of_another_family_is_an_error_unknown_hook_a_warning(tmp_path):
    unbox = write_unbox(
        tmp_path / "unet.up_blocks.0.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001",
        random_weights(D_BLOCK, M),
        k=K,
    )
    code, r, _ = inspect_json(unbox, "--family", "sd1")
    assert code == 1 and any("not a hookable block of sd1. It is a block of sdxl" in e for e in r["errors"])
    lens = write_saelens(tmp_path / "lens", random_weights(D_BLOCK, M), hook="blocks.8.hook_resid_post")
    code, r, _ = inspect_json(lens)
    assert code == 0 and r["block"] is None
    assert any(
        "'blocks.8.hook_resid_post'" in x and "choose the block in Load SAE" in x for x in r["warnings"]
    )


def test_convert_provenance_tells_user_choices_from_canonicalisation(tmp_path):
    src = write_unbox(
        tmp_path / "unet.up_blocks.0.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001",
        random_weights(D_BLOCK, M),
        k=K,
    )
    assert run("convert", src, tmp_path / "a.safetensors")[0] == 0
    prov = load_sae(tmp_path / "a.safetensors").cfg.provenance
    assert "hook_point 'unet.up_blocks.0.attentions.1' -> 'up_blocks.0.attentions.1'" in prov["conversions"]
    assert "overrides" not in prov
    assert run("convert", src, tmp_path / "b.safetensors", "--hook", "up.0.0")[0] == 0
    prov = load_sae(tmp_path / "b.safetensors").cfg.provenance
    assert prov["overrides"] == {"hook_point": "up_blocks.0.attentions.0"}
    code, out, _ = run("inspect", tmp_path / "b.safetensors")
    assert "overrides     hook_point=up_blocks.0.attentions.0" in out and "converted     from unbox" in out
