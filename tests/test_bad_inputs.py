"""A catalogue of bad inputs: files, metadata, concept files, interventions, CLI, node inputs, names and paths.

Each case asserts the pack's own error type (an SAEError, shown as sae_core.<Name>) and that the message names
the file or key, what was expected and what was found.
"""

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from sae_builders import random_weights, write_saelens, write_sparsify, write_unbox
from safetensors import safe_open
from safetensors.torch import save_file

import sae_core
from nodes import comfy_steps, folders, learn, masks, resolve
from sae_core.__main__ import main
from sae_core.concepts import ConceptDictionary, load_concepts
from sae_core.config import SAEConfig
from sae_core.detect import ConceptDetector, DetectionSettings
from sae_core.errors import (
    ConceptFileError,
    ConceptMismatchError,
    SAEConfigError,
    SAEError,
    SAEFileNotFoundError,
    SAEFormatError,
    SAEInputError,
    SAENonFiniteError,
    SAEPathError,
    SAEShapeError,
    SAETypeError,
    SAEWriteError,
    UnsafeCheckpointError,
)
from sae_core.formats import load_sae, save_native
from sae_core.intervention import BlockIntervention, Recorder, ReplaceSettings, StepInfo
from sae_core.sae import SparseAutoencoder
from sae_core.steer import SteerSettings

D, M, K = 8, 32, 4


def native_sae() -> SparseAutoencoder:
    return SparseAutoencoder(SAEConfig(d_in=D, n_latents=M, k=K), **random_weights(D, M))


def native_file(tmp: Path, *, config=None, tensors=None, meta=None) -> Path:
    """A native SAE file with its metadata / config / tensors changed as asked."""
    good = save_native(native_sae(), tmp / "good.safetensors")
    with safe_open(str(good), "pt") as f:
        metadata = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    if config is not None:
        cfg = json.loads(metadata["config"])
        cfg = config(cfg) if callable(config) else config
        metadata["config"] = cfg if isinstance(cfg, str) else json.dumps(cfg)
    for k, v in (meta or {}).items():
        if v is None:
            metadata.pop(k, None)
        else:
            metadata[k] = v
    if tensors is not None:
        ts = tensors(ts)
    path = tmp / "bad.safetensors"
    save_file(ts, str(path), metadata=metadata)
    return path


def cfg_with(**changes):
    def edit(cfg):
        for k, v in changes.items():
            if v is ...:
                cfg.pop(k)
            else:
                cfg[k] = v
        return cfg
    return edit


def sparsify_dir(tmp: Path, *, cfg=None, tensors=None) -> Path:
    d = write_sparsify(tmp / "up_blocks.1.attentions.1", random_weights(D, M), k=K)
    if cfg is not None:
        raw = json.loads((d / "cfg.json").read_text())
        (d / "cfg.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg(raw)))
    if tensors is not None:
        with safe_open(str(d / "sae.safetensors"), "pt") as f:
            ts = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors(ts), str(d / "sae.safetensors"))
    return d


def saelens_dir(tmp: Path, *, cfg=None, tensors=None, **kw) -> Path:
    d = write_saelens(tmp / "lens", random_weights(D, M), **kw)
    if cfg is not None:
        raw = json.loads((d / "cfg.json").read_text())
        (d / "cfg.json").write_text(json.dumps(cfg(raw)))
    if tensors is not None:
        with safe_open(str(d / "sae_weights.safetensors"), "pt") as f:
            ts = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors(ts), str(d / "sae_weights.safetensors"))
    return d


def unbox_dir(tmp: Path, *, blob=None, cfg=None, state=None, **kw) -> Path:
    d = write_unbox(tmp / "unbox", random_weights(D, M), k=K, **kw)
    if blob is not None:
        torch.save(blob, d / "state_dict.pth")
    if state is not None:
        st = torch.load(d / "state_dict.pth", weights_only=True)["state_dict"]
        torch.save({"state_dict": state(st)}, d / "state_dict.pth")
    if cfg is not None:
        raw = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(cfg(raw)))
    return d


def put(ts, **changes):
    for k, v in changes.items():
        if v is ...:
            ts.pop(k)
        else:
            ts[k] = v(ts) if callable(v) else v
    return ts


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


# ------------------------------------------------------------------------------------------------ SAE files

SAE_CASES = [
    # native metadata
    ("native-version-abc", lambda t: native_file(t, meta={"format_version": "abc"}), SAEFormatError,
     ["bad.safetensors", "format_version", "'abc'", "whole number"]),
    ("native-version-newer", lambda t: native_file(t, meta={"format_version": "99"}), SAEFormatError,
     ["bad.safetensors", "format_version 99", "newer", "(1)"]),
    ("native-config-missing", lambda t: native_file(t, meta={"config": None}), SAEFormatError,
     ["bad.safetensors", "'config' is missing", "found metadata keys"]),
    ("native-config-null", lambda t: native_file(t, config="null"), SAEFormatError,
     ["bad.safetensors", "'config' should be a non-empty JSON object", "found null"]),
    ("native-config-empty", lambda t: native_file(t, config="{}"), SAEFormatError,
     ["bad.safetensors", "'config' should be a non-empty JSON object", "found {}"]),
    ("native-config-array", lambda t: native_file(t, config="[1, 2]"), SAEFormatError,
     ["bad.safetensors", "non-empty JSON object", "[1, 2]"]),
    ("native-config-not-json", lambda t: native_file(t, config="{d_in"), SAEFormatError,
     ["bad.safetensors", "'config' is not valid JSON", "expected an object"]),
    ("native-eps-string", lambda t: native_file(t, config=cfg_with(layer_norm_eps="x")), SAEFormatError,
     ["bad.safetensors", "layer_norm_eps", "finite number", "'x'"]),
    ("native-eps-negative", lambda t: native_file(t, config=cfg_with(layer_norm_eps=-1.0)), SAEFormatError,
     ["bad.safetensors", "layer_norm_eps", ">= 0", "-1.0"]),
    ("native-provenance-list", lambda t: native_file(t, config=cfg_with(provenance=[1])), SAEFormatError,
     ["bad.safetensors", "provenance", "expected an object", "list"]),
    ("native-d_in-string", lambda t: native_file(t, config=cfg_with(d_in="8")), SAEFormatError,
     ["bad.safetensors", "d_in", "positive integer", "'8'"]),
    ("native-activation", lambda t: native_file(t, config=cfg_with(activation="softmax")), SAEFormatError,
     ["bad.safetensors", "activation", "relu_topk", "'softmax'"]),
    ("native-activation-list", lambda t: native_file(t, config=cfg_with(activation=["relu"])), SAEFormatError,
     ["bad.safetensors", "activation", "expected one of", "['relu']"]),
    ("native-k-zero", lambda t: native_file(t, config=cfg_with(k=0)), SAEFormatError,
     ["bad.safetensors", "SAEConfig.k", "1..32", "found 0"]),
    ("native-unknown-key", lambda t: native_file(t, config=cfg_with(foo=1)), SAEFormatError,
     ["bad.safetensors", "unknown keys ['foo']", "known keys"]),
    ("native-missing-key", lambda t: native_file(t, config=cfg_with(d_in=...)), SAEFormatError,
     ["bad.safetensors", "missing keys ['d_in']", "found keys"]),
    ("native-input-space", lambda t: native_file(t, config=cfg_with(input_space="middle")), SAEFormatError,
     ["bad.safetensors", "input_space", "('output', 'residual')", "'middle'"]),
    ("native-normalization", lambda t: native_file(t, config=cfg_with(normalization="batch")), SAEFormatError,
     ["bad.safetensors", "normalization", "layer_norm", "'batch'"]),
    ("native-hook-int", lambda t: native_file(t, config=cfg_with(hook_point=5)), SAEFormatError,
     ["bad.safetensors", "hook_point", "a string or None", "5"]),
    ("native-family", lambda t: native_file(t, config=cfg_with(model_family="sd2")), SAEFormatError,
     ["bad.safetensors", "model_family", "'sd1', 'sdxl', 'flux'", "'sd2'"]),
    ("native-bdec-flag", lambda t: native_file(t, config=cfg_with(apply_b_dec_to_input="yes")), SAEFormatError,
     ["bad.safetensors", "apply_b_dec_to_input", "a bool", "'yes'"]),
    ("native-int64-weights", lambda t: native_file(t, tensors=lambda ts: put(ts, W_enc=lambda s: s["W_enc"].long())),
     SAEShapeError, ["bad.safetensors", "'W_enc'", "int64", "floating-point"]),
    ("native-bool-bias", lambda t: native_file(t, tensors=lambda ts: put(ts, b_dec=lambda s: s["b_dec"] > 0)),
     SAEShapeError, ["bad.safetensors", "'b_dec'", "bool", "floating-point"]),
    ("native-extra-tensor", lambda t: native_file(t, tensors=lambda ts: put(ts, extra=torch.zeros(2))), SAEFormatError,
     ["bad.safetensors", "unexpected tensors ['extra']", "expected some of"]),
    ("native-wdec-shape", lambda t: native_file(t, tensors=lambda ts: put(ts, W_dec=torch.zeros(M, D + 1))),
     SAEShapeError, ["bad.safetensors", "'W_dec'", "(32, 9)", "expected (32, 8)"]),
    ("native-nan", lambda t: native_file(t, tensors=lambda ts: put(ts, W_enc=lambda s: s["W_enc"].index_fill(0, torch.tensor([3]), float("nan")))),
     SAENonFiniteError, ["bad.safetensors", "'W_enc'", "8 NaN/inf", "expected only finite"]),
    ("native-foreign-safetensors", lambda t: native_file(t, meta={"format": None}), SAEFormatError,
     ["bad.safetensors", "format=None", "expected 'sae-concept-eraser/sae'"]),
    # files and layouts
    ("missing-path", lambda t: t / "nope", SAEFormatError, ["nope", "no such file or directory", "expected an SAE file"]),
    ("nul-in-path", lambda t: str(t / "a\x00b.safetensors"), SAEFormatError, ["NUL byte", "no file name"]),
    ("garbage-safetensors", lambda t: _write(t / "x.safetensors", os.urandom(64)), SAEFormatError,
     ["x.safetensors", "not a readable safetensors file", "download it again"]),
    ("empty-safetensors", lambda t: _write(t / "x.safetensors", b""), SAEFormatError,
     ["x.safetensors", "not a readable safetensors file"]),
    ("text-file", lambda t: _write(t / "x.txt", b"hello"), SAEFormatError,
     ["x.txt", "unrecognised file", "expected a native .safetensors"]),
    ("cfg-json-is-a-directory", lambda t: _mkdirs(t / "ck", "cfg.json", files={"sae.safetensors": b"x"}), SAEFormatError,
     ["cfg.json", "is a directory", "expected the checkpoint's config file"]),
    ("weights-are-a-directory", lambda t: _mkdirs(t / "ck", "sae.safetensors", files={"cfg.json": b"{}"}),
     SAEFormatError, ["sae.safetensors", "is a directory", "weights file"]),
    ("config-without-weights", lambda t: _mkdirs(t / "ck", files={"cfg.json": b"{}"}), SAEFormatError,
     ["cfg.json", "weights are missing", "found ['cfg.json']"]),
    ("empty-directory", lambda t: _mkdirs(t / "ck"), SAEFormatError, ["ck", "unrecognised layout", "found []"]),
    ("two-checkpoints", lambda t: (sparsify_dir(t / "a"), sparsify_dir(t / "b"), t)[-1], SAEFormatError,
     ["holds 2 SAE checkpoints", "pass one of them"]),
    # sparsify
    ("sparsify-cfg-not-json", lambda t: sparsify_dir(t, cfg="{oops"), SAEFormatError,
     ["cfg.json", "not valid JSON", "expected the checkpoint's config object"]),
    ("sparsify-cfg-array", lambda t: sparsify_dir(t, cfg="[1]"), SAEFormatError, ["cfg.json", "expected a JSON object", "list"]),
    ("sparsify-cfg-bad-utf8", lambda t: sparsify_dir(t, cfg=b"\xff\xfe{".decode("latin-1")), SAEFormatError,
     ["cfg.json", "not valid JSON"]),
    ("sparsify-d_in-string", lambda t: sparsify_dir(t, cfg=lambda c: {**c, "d_in": "x"}), SAEFormatError,
     ["cfg.json", "'d_in' should be an integer", "'x'"]),
    ("sparsify-d_in-missing", lambda t: sparsify_dir(t, cfg=lambda c: {k: v for k, v in c.items() if k != "d_in"}),
     SAEFormatError, ["cfg.json", "missing key 'd_in'", "found keys"]),
    ("sparsify-0d-encoder", lambda t: sparsify_dir(t, tensors=lambda ts: put(ts, **{"encoder.weight": torch.tensor(1.0)})),
     SAEShapeError, ["sae.safetensors", "'encoder.weight'", "0 dimensions", "expected 2"]),
    ("sparsify-int-encoder", lambda t: sparsify_dir(t, tensors=lambda ts: put(ts, **{"encoder.weight": torch.zeros(M, D, dtype=torch.int32)})),
     SAEFormatError, ["sae.safetensors", "'encoder.weight'", "int32", "floating-point"]),
    ("sparsify-missing-wdec", lambda t: sparsify_dir(t, tensors=lambda ts: put(ts, W_dec=...)), SAEFormatError,
     ["sae.safetensors", "missing tensor 'W_dec'", "found keys"]),
    ("sparsify-activation", lambda t: sparsify_dir(t, cfg=lambda c: {**c, "activation": "softmax"}), SAEFormatError,
     ["cfg.json", "activation 'softmax'", "expected 'topk' or 'groupmax'"]),
    ("sparsify-activation-int", lambda t: sparsify_dir(t, cfg=lambda c: {**c, "activation": 5}), SAEFormatError,
     ["cfg.json", "activation 5", "expected 'topk'"]),
    ("sparsify-unit-norm", lambda t: sparsify_dir(t, cfg=lambda c: {**c, "input_unit_norm": True}), SAEFormatError,
     ["cfg.json", "input_unit_norm is true", "expected false"]),
    ("sparsify-unit-norm-string", lambda t: sparsify_dir(t, cfg=lambda c: {**c, "input_unit_norm": "no"}), SAEFormatError,
     ["cfg.json", "'input_unit_norm'", "true or false", "'no'"]),
    ("sparsify-transcoder", lambda t: sparsify_dir(t, cfg=lambda c: {**c, "transcode": True}), SAEFormatError,
     ["cfg.json", "transcode is true", "expected an SAE"]),
    ("sparsify-k-negative", lambda t: sparsify_dir(t, cfg=lambda c: {**c, "k": -3}), SAEFormatError,
     ["cfg.json", "'k'", "positive integer", "-3"]),
    ("sparsify-width-mismatch", lambda t: sparsify_dir(t, cfg=lambda c: {**c, "d_in": D + 1, "num_latents": 0,
                                                                         "expansion_factor": 4}), SAEFormatError,
     ["cfg.json", "d_in=9", "'encoder.weight' has 8", "different SAEs"]),
    ("sparsify-extra-tensor", lambda t: sparsify_dir(t, tensors=lambda ts: put(ts, junk=torch.zeros(1))), SAEFormatError,
     ["sae.safetensors", "unexpected tensors ['junk']"]),
    # SAELens
    ("saelens-architecture", lambda t: saelens_dir(t, architecture="gated"), SAEFormatError,
     ["cfg.json", "architecture 'gated'", "expected one of standard, topk, jumprelu"]),
    ("saelens-architecture-int", lambda t: saelens_dir(t, cfg=lambda c: {**c, "architecture": 5}), SAEFormatError,
     ["cfg.json", "'architecture' should be a string", "5"]),
    ("saelens-topk-without-k", lambda t: saelens_dir(t, architecture="topk"), SAEFormatError,
     ["cfg.json", "'topk' needs a positive integer 'k'", "None"]),
    ("saelens-jumprelu-no-threshold", lambda t: saelens_dir(t, architecture="jumprelu"), SAEFormatError,
     ["sae_weights.safetensors", "needs a 'threshold' tensor", "found keys"]),
    ("saelens-normalize", lambda t: saelens_dir(t, normalize="weird"), SAEFormatError,
     ["cfg.json", "normalize_activations 'weird'", "not supported"]),
    ("saelens-metadata-list", lambda t: saelens_dir(t, cfg=lambda c: {**c, "metadata": [1]}), SAEFormatError,
     ["cfg.json", "'metadata' should be an object", "list"]),
    ("saelens-bdec-flag", lambda t: saelens_dir(t, cfg=lambda c: {**c, "apply_b_dec_to_input": "no"}), SAEFormatError,
     ["cfg.json", "'apply_b_dec_to_input'", "true or false", "'no'"]),
    ("saelens-wenc-1d", lambda t: saelens_dir(t, tensors=lambda ts: put(ts, W_enc=torch.zeros(D))), SAEShapeError,
     ["sae_weights.safetensors", "'W_enc'", "1 dimensions", "expected 2"]),
    ("saelens-scale-factor", lambda t: saelens_dir(t, cfg=lambda c: {**c, "normalize_activations": "expected_average_only_in",
                                                                      "norm_scaling_factor": "big"}), SAEFormatError,
     ["cfg.json", "'norm_scaling_factor'", "positive number", "'big'"]),
    # sdxl-unbox / OpenAI
    ("unbox-none", lambda t: unbox_dir(t, blob=None) and (torch.save(None, t / "unbox" / "state_dict.pth"), t / "unbox")[1],
     SAEFormatError, ["state_dict.pth", "expected a dict of tensors", "found NoneType at the top level"]),
    ("unbox-state-none", lambda t: unbox_dir(t, blob={"state_dict": None}), SAEFormatError,
     ["state_dict.pth", "expected a dict of tensors", "found NoneType under 'state_dict'"]),
    ("unbox-list", lambda t: unbox_dir(t, blob=[1, 2]), SAEFormatError, ["state_dict.pth", "found list at the top level"]),
    ("unbox-act-state-tensor", lambda t: unbox_dir(t, state=lambda s: {**s, "activation": "TopK", "activation_state_dict": torch.ones(2)}),
     SAEFormatError, ["state_dict.pth", "'activation_state_dict' should be a dict", "Tensor"]),
    ("unbox-act-state-list", lambda t: unbox_dir(t, state=lambda s: {**s, "activation": "TopK", "activation_state_dict": [4]}),
     SAEFormatError, ["state_dict.pth", "'activation_state_dict' should be a dict", "list"]),
    ("unbox-act-k-string", lambda t: unbox_dir(t, state=lambda s: {**s, "activation": "TopK", "activation_state_dict": {"k": "4"}}),
     SAEFormatError, ["state_dict.pth", "activation_state_dict['k']", "positive integer", "'4'"]),
    ("unbox-activation-gelu", lambda t: unbox_dir(t, state=lambda s: {**s, "activation": "GELU"}), SAEFormatError,
     ["state_dict.pth", "activation 'GELU'", "expected 'TopK' or 'ReLU'"]),
    ("unbox-pickle-payload", lambda t: unbox_dir(t) and (_write(t / "unbox" / "state_dict.pth", pickle.dumps({"state_dict": Evil()})), t / "unbox")[1],
     UnsafeCheckpointError, ["state_dict.pth", "safe loading refuses", "expected a dict of tensors"]),
    ("unbox-garbage", lambda t: unbox_dir(t) and (_write(t / "unbox" / "state_dict.pth", b"PK\x03\x04garbage"), t / "unbox")[1],
     SAEFormatError, ["state_dict.pth", "not a readable torch file", "truncated or corrupt"]),
    ("unbox-mean-shape", lambda t: unbox_dir(t) and (torch.save(torch.zeros(3), t / "unbox" / "mean.pt"), t / "unbox")[1],
     SAEFormatError, ["mean.pt", "shape (32,)", "found shape (3,)"]),
    ("unbox-config-missing-key", lambda t: unbox_dir(t, cfg=lambda c: {k: v for k, v in c.items() if k != "n_dirs_local"}),
     SAEFormatError, ["config.json", "missing key 'n_dirs_local'", "found keys"]),
    ("unbox-normalize-string", lambda t: unbox_dir(t, cfg=lambda c: {**c, "normalize": "yes"}), SAEFormatError,
     ["config.json", "'normalize'", "true or false", "'yes'"]),
    ("unbox-0d-decoder", lambda t: unbox_dir(t, state=lambda s: {**s, "decoder.weight": torch.tensor(2.0)}), SAEShapeError,
     ["state_dict.pth", "'decoder.weight'", "0 dimensions", "expected 2"]),
]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _mkdirs(root: Path, *dirs: str, files: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for d in dirs:
        (root / d).mkdir()
    for name, data in (files or {}).items():
        (root / name).write_bytes(data)
    return root


def check(excinfo, err_type, needles):
    e = excinfo.value
    assert isinstance(e, err_type) and isinstance(e, SAEError), f"{type(e).__name__}: {e}"
    assert type(e).__module__ == "sae_core"
    for needle in needles:
        assert needle in str(e), f"{needle!r} not in message: {e}"


@pytest.mark.parametrize("build, err_type, needles", [c[1:] for c in SAE_CASES], ids=[c[0] for c in SAE_CASES])
def test_bad_sae_file(tmp_path, build, err_type, needles):
    path = build(tmp_path)
    with pytest.raises(SAEError) as excinfo:
        load_sae(path)
    check(excinfo, err_type, needles)


def test_non_utf8_path_loads(tmp_path):
    """A valid file under a path that is not UTF-8 loads (it used to be called truncated)."""
    if os.name != "posix":
        pytest.skip("byte paths are a POSIX matter")
    raw = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(raw)
    path = Path(os.fsdecode(raw)) / "sae.safetensors"
    sae = native_sae()
    save_native(sae, path)
    assert load_sae(path).fingerprint() == sae.fingerprint()
    assert os.listdir(raw) == [b"sae.safetensors"]


# ------------------------------------------------------------------------------------------------ concept files


def concept_file(tmp: Path, *, header=None, tensors=None, raw_header=None) -> Path:
    d = ConceptDictionary.from_latents([1, 4], M, threshold=0.5, means=[1.0, 2.0], sae_fingerprint="0123456789abcdef")
    good = tmp / "good.safetensors"
    d.save(good)
    with safe_open(str(good), "pt") as f:
        meta = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    h = json.loads(meta["sae_concepts"])
    if header is not None:
        h = header(h)
    meta["sae_concepts"] = raw_header if raw_header is not None else json.dumps(h)
    if tensors is not None:
        ts = tensors(ts)
    path = tmp / "bad.safetensors"
    save_file(ts, str(path), metadata=meta)
    return path


def hdr(**changes):
    def edit(h):
        for k, v in changes.items():
            if v is ...:
                h.pop(k)
            else:
                h[k] = v
        return h
    return edit


CONCEPT_CASES = [
    ("header-array", lambda t: concept_file(t, raw_header="[1, 2]"), ConceptFileError,
     ["bad.safetensors", "should be a JSON object", "JSON list"]),
    ("header-not-json", lambda t: concept_file(t, raw_header="{"), ConceptFileError, ["bad.safetensors", "not valid JSON"]),
    ("names-string", lambda t: concept_file(t, header=hdr(names="cat")), ConceptFileError,
     ["bad.safetensors", "'names' should be a list of non-empty strings", "'cat'"]),
    ("names-int", lambda t: concept_file(t, header=hdr(names=[3])), ConceptFileError,
     ["bad.safetensors", "'names'", "[3]"]),
    ("n_latents-string", lambda t: concept_file(t, header=hdr(n_latents="many")), ConceptFileError,
     ["bad.safetensors", "'n_latents' should be a positive integer", "'many'"]),
    ("n_latents-float", lambda t: concept_file(t, header=hdr(n_latents=2.5)), ConceptFileError,
     ["bad.safetensors", "'n_latents'", "2.5"]),
    ("prompts-list", lambda t: concept_file(t, header=hdr(prompts=["a"])), ConceptFileError,
     ["bad.safetensors", "'prompts' should be an object", "['a']"]),
    ("prompts-values", lambda t: concept_file(t, header=hdr(prompts={"a": "x"})), ConceptFileError,
     ["bad.safetensors", "'prompts'", "{'a': 'x'}"]),
    ("fingerprint-int", lambda t: concept_file(t, header=hdr(sae_fingerprint=5)), ConceptFileError,
     ["bad.safetensors", "'sae_fingerprint' should be a string or null", "5"]),
    ("selection-list", lambda t: concept_file(t, header=hdr(selection=[1])), ConceptFileError,
     ["bad.safetensors", "'selection' should be an object", "[1]"]),
    ("format", lambda t: concept_file(t, header=hdr(format="other")), ConceptFileError,
     ["bad.safetensors", "format 'other'", "expected 'sae-concepts'"]),
    ("names-missing", lambda t: concept_file(t, header=hdr(names=...)), ConceptFileError,
     ["bad.safetensors", "metadata lacks 'names'", "found keys"]),
    ("float-latent-ids", lambda t: concept_file(t, tensors=lambda ts: put(ts, latents=lambda s: s["latents"].float() + 0.5)),
     ConceptFileError, ["bad.safetensors", "'latents' has dtype float32", "expected integer latent ids"]),
    ("nan-thresholds", lambda t: concept_file(t, tensors=lambda ts: put(ts, thresholds=lambda s: s["thresholds"] * float("nan"))),
     ConceptFileError, ["bad.safetensors", "thresholds holds 2 NaN/inf", "expected finite"]),
    ("inf-timesteps", lambda t: concept_file(t, tensors=lambda ts: put(ts, timesteps=torch.tensor([float("inf")]))),
     ConceptFileError, ["bad.safetensors", "timesteps holds 1 NaN/inf", "expected finite"]),
    ("negative-threshold", lambda t: concept_file(t, tensors=lambda ts: put(ts, thresholds=lambda s: s["thresholds"] - 1)),
     ConceptFileError, ["bad.safetensors", "thresholds hold negative values", "expected values >= 0"]),
    ("missing-means", lambda t: concept_file(t, tensors=lambda ts: put(ts, means=...)), ConceptFileError,
     ["bad.safetensors", "missing tensors ['means']", "expected"]),
    ("latent-out-of-range", lambda t: concept_file(t, tensors=lambda ts: put(ts, latents=lambda s: s["latents"] + 100)),
     ConceptFileError, ["bad.safetensors", "latent ids range", "0..31"]),
    ("scores-shape", lambda t: concept_file(t, tensors=lambda ts: put(ts, scores=torch.zeros(1, 1, 5))), ConceptFileError,
     ["bad.safetensors", "scores has shape (1, 1, 5)", "expected (1, 1, 2)"]),
    ("int-timesteps", lambda t: concept_file(t, tensors=lambda ts: put(ts, timesteps=torch.zeros(1, dtype=torch.long))),
     ConceptFileError, ["bad.safetensors", "'timesteps' has dtype int64", "float"]),
    ("garbage", lambda t: _write(t / "c.safetensors", b"\x00" * 40), ConceptFileError,
     ["c.safetensors", "not a readable safetensors file", "expected a concept file"]),
    ("a-directory", lambda t: _mkdirs(t / "c.safetensors"), ConceptFileError, ["c.safetensors", "is a directory"]),
    ("an-sae-file", lambda t: save_native(native_sae(), t / "s.safetensors"), ConceptFileError,
     ["s.safetensors", "no 'sae_concepts' entry", "not a concept dictionary"]),
    ("missing-file", lambda t: t / "none.safetensors", SAEFileNotFoundError, ["none.safetensors", "not found"]),
]


@pytest.mark.parametrize("build, err_type, needles", [c[1:] for c in CONCEPT_CASES], ids=[c[0] for c in CONCEPT_CASES])
def test_bad_concept_file(tmp_path, build, err_type, needles):
    path = build(tmp_path)
    with pytest.raises(SAEError) as excinfo:
        load_concepts(path)
    check(excinfo, err_type, needles)


def test_null_fingerprint_is_refused_with_an_sae(tmp_path):
    path = concept_file(tmp_path, header=hdr(sae_fingerprint=None))
    assert load_concepts(path).meta.sae_fingerprint is None  # readable on its own
    with pytest.raises(SAEError) as excinfo:
        load_concepts(path, sae=native_sae())
    check(excinfo, ConceptMismatchError, ["bad.safetensors", "records no SAE fingerprint", "learn the concept again"])


def test_other_fingerprint_is_refused(tmp_path):
    path = concept_file(tmp_path)
    with pytest.raises(SAEError) as excinfo:
        load_concepts(path, sae=native_sae())
    check(excinfo, ConceptMismatchError, ["bad.safetensors", "fingerprint 0123456789abcdef", "has fingerprint"])


# ------------------------------------------------------------------------------------------------ values


def _detector():
    sae = native_sae()
    return sae, ConceptDetector(ConceptDictionary.from_latents([1], M, threshold=0.1), sae=sae)


VALUE_CASES = [
    ("detect-negative-scale", lambda: DetectionSettings(threshold_scale=-1), SAEInputError,
     ["threshold_scale is -1", "expected a number >= 0"]),
    ("detect-nan-scale", lambda: DetectionSettings(threshold_scale=float("nan")), SAEInputError, ["threshold_scale is nan"]),
    ("detect-padding-float", lambda: DetectionSettings(padding=1.5), SAEInputError, ["padding is 1.5", "expected an integer"]),
    ("steer-method", lambda: SteerSettings("erase"), SAEInputError, ["method is 'erase'", "saeuron_scale"]),
    ("steer-strength-nan", lambda: SteerSettings(strength=float("nan")), SAEInputError, ["strength is nan", "finite number"]),
    ("steer-strength-string", lambda: SteerSettings(strength="1"), SAEInputError, ["strength is '1'", "finite number"]),
    ("steer-error", lambda: SteerSettings(error="fix"), SAEInputError, ["error is 'fix'", "preserve"]),
    ("steer-cfg-sign", lambda: SteerSettings(cfg_sign="flip"), SAEInputError, ["cfg_sign is 'flip'", "opposite"]),
    ("steer-cfg-sign-method", lambda: SteerSettings("set", 1.0, cfg_sign="opposite"), SAEInputError,
     ["cfg_sign 'opposite'", "method 'set'", "use unbox_add or gsae_add"]),
    ("steer-from-dict", lambda: SteerSettings.from_dict({"gamma": 1}), SAEInputError, ["unknown keys ['gamma']", "expected"]),
    ("replace-mode", lambda: ReplaceSettings(mode="blur"), SAEInputError, ["mode is 'blur'", "random"]),
    ("replace-target", lambda: ReplaceSettings(target="input"), SAEInputError, ["target is 'input'", "'output' or 'residual'"]),
    ("typed-negative-threshold", lambda: ConceptDictionary.from_latents([1], M, threshold=-0.1), SAEInputError,
     ["threshold is -0.1", "finite number >= 0", "mark every patch"]),
    ("typed-nan-threshold", lambda: ConceptDictionary.from_latents([1], M, threshold=float("nan")), SAEInputError,
     ["threshold is nan", "expected a finite number"]),
    ("typed-float-id", lambda: ConceptDictionary.from_latents([1.5], M), SAEInputError, ["latent ids [1.5] are not integers"]),
    ("typed-out-of-range", lambda: ConceptDictionary.from_latents([40], M), SAEInputError, ["latent ids [40] out of range 0..31"]),
    ("typed-empty", lambda: ConceptDictionary.from_latents([], M), SAEInputError, ["no latent ids given"]),
    ("typed-nan-means", lambda: ConceptDictionary.from_latents([1], M, means=[float("nan")]), SAEInputError,
     ["means [nan]", "finite"]),
    ("intervention-branches", lambda: BlockIntervention(*_detector(), branches="neg"), SAEInputError,
     ["branches is 'neg'", "['cond', 'uncond', 'both']"]),
    ("intervention-edit-type", lambda: BlockIntervention(*_detector(), edit={"mode": "random"}), SAETypeError,
     ["edit is dict", "expected ReplaceSettings"]),
    ("intervention-region-mode", lambda: BlockIntervention(*_detector(), region_mode="union"), SAEInputError,
     ["region_mode is 'union'", "['intersect', 'replace']"]),
    ("intervention-region-4d", lambda: BlockIntervention(*_detector(), region=torch.ones(1, 1, 4, 4)), SAEInputError,
     ["region should be a mask [N, H, W]", "(1, 1, 4, 4)"]),
    ("intervention-width", lambda: BlockIntervention(*_detector())(None, torch.zeros(1, D + 2, 3, 3), StepInfo(1.0)),
     SAEInputError, ["block output has shape (1, 10, 3, 3)", "expected [B, 8, H, W]"]),
    ("intervention-chunks", lambda: BlockIntervention(*_detector())(None, torch.zeros(3, D, 2, 2), StepInfo(1.0, chunks=(0, 1))),
     SAEInputError, ["batch of 3 rows does not split into 2 equal CFG chunks"]),
    ("step-chunks", lambda: StepInfo(1.0, chunks=(2,)), SAEInputError, ["chunks is (2,)", "0 (cond) / 1 (uncond)"]),
    ("sae-width", lambda: native_sae().encode(torch.zeros(2, D + 1)), SAEShapeError,
     ["input has width 9", "expected d_in=8"]),
    ("config-type", lambda: SAEConfig.from_dict([1]), SAEConfigError, ["expected an object (dict) of settings", "list"]),
    ("override-k", lambda: load_sae(save_native(native_sae(), Path(_TMP[0]) / "o.safetensors"), k=-2), SAEConfigError,
     ["override k=-2", "positive integer"]),
    ("override-activation-type", lambda: load_sae(save_native(native_sae(), Path(_TMP[0]) / "o.safetensors"),
                                                  activation=["relu"]), SAEConfigError,
     ["override activation=['relu']", "should be a string"]),
]
_TMP: list = []


@pytest.mark.parametrize("call, err_type, needles", [c[1:] for c in VALUE_CASES], ids=[c[0] for c in VALUE_CASES])
def test_bad_value(tmp_path, call, err_type, needles):
    _TMP[:] = [tmp_path]
    with pytest.raises(SAEError) as excinfo:
        call()
    check(excinfo, err_type, needles)


def test_empty_batch_is_returned_as_is():
    sae, det = _detector()
    empty = torch.zeros(0, D, 3, 3)
    iv = BlockIntervention(sae, det, ReplaceSettings(), recorder=Recorder())
    assert iv(None, empty, StepInfo(1.0, chunks=(1, 0))) is empty


# ------------------------------------------------------------------------------------------------ CLI


def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


CLI_CASES = [
    ("inspect-missing", lambda t: ("inspect", t / "nope"), ["nope", "no such file or directory"]),
    ("inspect-config-null", lambda t: ("inspect", native_file(t, config="null")), ["'config' should be a non-empty JSON object"]),
    ("inspect-provenance-list", lambda t: ("inspect", native_file(t, config=cfg_with(provenance=[]))), ["provenance"]),
    ("inspect-cfg-dir", lambda t: ("inspect", _mkdirs(t / "ck", "cfg.json", files={"sae.safetensors": b"x"})),
     ["cfg.json: is a directory"]),
    ("inspect-nul", lambda t: ("inspect", str(t) + "/a\x00b"), ["NUL byte"]),
    ("convert-activation", lambda t: ("convert", native_file(t), t / "o.safetensors", "--activation", "softmax"),
     ["--activation 'softmax' is unknown", "expected one of"]),
    ("convert-input-space", lambda t: ("convert", native_file(t), t / "o.safetensors", "--input-space", "x"),
     ["--input-space 'x' is unknown"]),
    ("convert-k", lambda t: ("convert", native_file(t), t / "o.safetensors", "--k", "-1"), ["--k -1", "positive integer"]),
    ("convert-dst-nul", lambda t: ("convert", native_file(t), str(t) + "/o\x00.safetensors"), ["NUL byte"]),
    ("convert-dst-long", lambda t: ("convert", native_file(t), t / ("o" * 300 + ".safetensors")), ["bytes long", "expected at most"]),
    ("convert-dst-suffix", lambda t: ("convert", native_file(t), t / "o.bin"), ["o.bin", "must end in .safetensors"]),
    ("convert-dst-exists", lambda t: ("convert", native_file(t), native_file(t)), ["already exists", "--force"]),
    ("convert-dst-dir", lambda t: ("convert", native_file(t), _mkdirs(t / "d.safetensors"), "--force"), ["is a directory"]),
    ("convert-family", lambda t: ("convert", native_file(t), t / "o.safetensors", "--family", "sd2"), ["unknown model family 'sd2'"]),
    ("inspect-device", lambda t: ("inspect", "/dev/null" if os.path.exists("/dev/null") else t / "nope"),
     ["/dev/null" if os.path.exists("/dev/null") else "nope"]),
    ("convert-dst-under-a-file", lambda t: ("convert", native_file(t), native_file(t) / "o.safetensors"),
     ["bad.safetensors is a file, not a folder"]),
    ("convert-src-pickle", lambda t: ("convert", unbox_dir(t) and (_write(t / "unbox" / "state_dict.pth", pickle.dumps(Evil())), t / "unbox")[1],
                                      t / "o.safetensors"), ["safe loading refuses"]),
]


@pytest.mark.parametrize("argv, needles", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input(tmp_path, argv, needles):
    code, out, err = cli(*argv(tmp_path))
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err + out and "unexpected" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def test_cli_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that fails half way (disk full) is one line, exit 1; the old destination intact, no debris."""
    import sae_core.formats.native as native

    src = native_file(tmp_path)
    dst = tmp_path / "out" / "o.safetensors"
    dst.parent.mkdir()
    dst.write_bytes(b"old contents")

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(native, "save_file", full_disk)
    code, out, err = cli("convert", src, dst, "--force")
    assert code == 1 and err.count("error:") == 1 and "Traceback" not in err
    assert f"{dst}: writing the SAE file failed (the disk is full)" in err
    assert dst.read_bytes() == b"old contents" and os.listdir(dst.parent) == ["o.safetensors"]


# ------------------------------------------------------------------------------------------------ nodes, names, paths


class Folders:
    def __init__(self, root: Path):
        self.models_dir = str(root)
        self.folder_names_and_paths = {}

    def get_folder_paths(self, name):
        return list(self.folder_names_and_paths[name][0])

    def get_full_path(self, name, rel):  # ComfyUI's own normalisation: it keeps '..' out, our check must too
        for p in self.folder_names_and_paths[name][0]:
            full = os.path.join(p, rel)
            if os.path.isfile(full):
                return full
        return None


def _folders(t: Path) -> Folders:
    f = Folders(t / "models")
    folders.register(f)
    (t / "models" / "sae").mkdir(parents=True)
    (t / "outside").mkdir()
    save_native(native_sae(), t / "outside" / "x.safetensors")
    write_sparsify(t / "outside" / "ck", random_weights(D, M), k=K)
    return f


NODE_CASES = [
    ("save-nul", lambda t: folders.concept_save_path(_folders(t), "ca\x00t"), SAEPathError, ["'ca\\x00t'", "control character"]),
    ("save-300", lambda t: folders.concept_save_path(_folders(t), "c" * 300), SAEPathError, ["bytes long", "expected at most"]),
    ("save-dotdot", lambda t: folders.concept_save_path(_folders(t), "../x"), SAEPathError, ["'../x'", "plain name"]),
    ("save-hidden", lambda t: folders.concept_save_path(_folders(t), ".x"), SAEPathError, ["'.x'", "not hidden"]),
    ("save-folder", lambda t: folders.concept_save_path(_folders(t), "a/b"), SAEPathError, ["'a/b'", "no folders"]),
    ("save-backslash", lambda t: folders.concept_save_path(_folders(t), "a\\b"), SAEPathError, ["plain name"]),
    ("save-newline", lambda t: folders.concept_save_path(_folders(t), "a\nb"), SAEPathError, ["control character"]),
    ("load-sae-dotdot-dir", lambda t: folders.resolve_sae_entry(_folders(t), "../../outside/ck/"), SAEPathError,
     ["'../../outside/ck/'", "leaves it", "models/sae"]),
    ("load-sae-dotdot-file", lambda t: folders.resolve_sae_entry(_folders(t), "../../outside/x.safetensors"), SAEPathError,
     ["leaves it"]),
    ("load-sae-absolute", lambda t: folders.resolve_sae_entry(_folders(t), str(t / "outside" / "x.safetensors")),
     SAEPathError, ["leaves it"]),
    ("load-sae-windows", lambda t: folders.resolve_sae_entry(_folders(t), "..\\..\\outside\\x.safetensors"), SAEPathError,
     ["leaves it"]),
    ("load-sae-missing", lambda t: folders.resolve_sae_entry(_folders(t), "gone.safetensors"), SAEFileNotFoundError,
     ["'gone.safetensors' not found under models/sae", "press r"]),
    ("load-sae-nul", lambda t: folders.resolve_sae_entry(_folders(t), "a\x00"), SAEPathError, ["as listed by Load SAE"]),
    ("latent-ids", lambda t: learn.parse_latent_ids("3, 1.5, x"), SAEInputError, ["['1.5', 'x'] are not non-negative integers"]),
    ("color", lambda t: masks.parse_color("red"), SAEInputError, ["color is 'red'", "#ff3300"]),
    ("window", lambda t: comfy_steps.check_window(0.8, 0.2), SAEInputError, ["start_percent 0.8 and end_percent 0.2", "start <= end"]),
    ("steer-node-sign", lambda t: resolve.steer_settings("unbox_add", 1.0, "preserve", True, cfg_sign="both"), SAEInputError,
     ["cfg_sign is 'both'"]),
    ("mask-preview-uncond-cfg1", lambda t: masks.recorded_maps(_cond_only(), "mask", "uncond", 0), SAEInputError,
     ["branch 'uncond' recorded nothing", "['cond']", "At cfg 1", "Choose branch 'cond'"]),
    ("mask-preview-step", lambda t: masks.pick_step([0, 1], torch.zeros(2, 2, 2), 5, "max"), SAEInputError,
     ["step 5 was not recorded", "[0, 1]", "-1"]),
    ("mask-preview-show", lambda t: masks.recorded_maps(_cond_only(), "heat", "cond", 0), SAEInputError,
     ["show is 'heat'", "['mask', 'score']"]),
]


def _cond_only() -> Recorder:
    rec = Recorder()
    rec.add("blk", StepInfo(1.0, step_index=0), 0, 0, torch.ones(1, 2, 2, dtype=torch.bool), None, torch.zeros(1, dtype=torch.bool))
    return rec


@pytest.mark.parametrize("call, err_type, needles", [c[1:] for c in NODE_CASES], ids=[c[0] for c in NODE_CASES])
def test_bad_node_input(tmp_path, call, err_type, needles):
    with pytest.raises(SAEError) as excinfo:
        call(tmp_path)
    check(excinfo, err_type, needles)


def test_save_concept_atomic_and_readable(tmp_path, monkeypatch):
    """Concept files land with normal permissions; a failure mid-write leaves the old file and no debris."""
    f = _folders(tmp_path)
    path = folders.concept_save_path(f, "cat")
    d = ConceptDictionary.from_latents([1], M, threshold=0.5)
    old_umask = os.umask(0o022)
    try:
        d.save(path)
    finally:
        os.umask(old_umask)
    assert os.stat(path).st_mode & 0o777 == 0o644
    before = Path(path).read_bytes()
    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(SAEWriteError, match=r"cat\.safetensors: writing the concept file failed \(RuntimeError: interrupted\)"):
        ConceptDictionary.from_latents([2], M, threshold=0.5).save(path)
    assert Path(path).read_bytes() == before and sorted(os.listdir(Path(path).parent)) == ["cat.safetensors"]


def test_error_classes_show_as_sae_core():
    for name in sae_core.errors.__all__:
        cls = getattr(sae_core, name)
        assert cls.__module__ == "sae_core" and issubclass(cls, sae_core.SAEError) and issubclass(cls, ValueError)
    assert f"{sae_core.BlockMismatchError.__module__}.{sae_core.BlockMismatchError.__qualname__}" == "sae_core.BlockMismatchError"
    e = pickle.loads(pickle.dumps(sae_core.BlockMismatchError("x: d_in=3")))
    assert type(e) is sae_core.BlockMismatchError and str(e) == "x: d_in=3"


def test_catalogue_size():
    assert len(SAE_CASES) + len(CONCEPT_CASES) + len(VALUE_CASES) + len(CLI_CASES) + len(NODE_CASES) >= 80
