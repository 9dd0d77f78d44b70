"""Property-based fuzzing of every loader and of the format detection: whatever the files hold, only the pack's
own errors (SAEError) escape. Example counts stay modest so the suite stays fast; raise them locally with
HYPOTHESIS_PROFILE=long."""

import json
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sae_builders import random_weights, write_saelens, write_sparsify, write_unbox
from safetensors.torch import save, save_file

from sae_core.concepts import ConceptDictionary, load_concepts
from sae_core.config import SAEConfig
from sae_core.errors import SAEError
from sae_core.formats import detect_format, load_sae, save_native
from sae_core.sae import SparseAutoencoder

D, M, K = 8, 32, 4

settings.register_profile("default", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "1000")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]


@st.composite
def tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 40), max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["zeros", "randn", "nan"]))
    t = torch.zeros(shape, dtype=torch.float32)
    if kind == "randn":
        t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    elif kind == "nan" and t.numel():
        t = t.fill_(float("nan"))
    return t.to(dtype) if dtype.is_floating_point else t.nan_to_num().to(dtype)


def only_pack_errors(call):
    """Run ``call``; any exception other than an SAEError fails the property."""
    try:
        call()
    except SAEError:
        pass


def mutate_dict(base: dict, draw) -> dict:
    out = dict(base)
    for key in draw(st.lists(st.sampled_from(sorted(base) + ["extra"]), max_size=4, unique=True)):
        action = draw(st.sampled_from(["drop", "replace"]))
        if action == "drop":
            out.pop(key, None)
        else:
            out[key] = draw(json_values)
    return out


def mutate_tensors(base: dict, draw) -> dict:
    out = dict(base)
    for key in draw(st.lists(st.sampled_from(sorted(base) + ["junk"]), max_size=3, unique=True)):
        if draw(st.booleans()):
            out.pop(key, None)
        else:
            out[key] = draw(tensors())
    return out


def good_sae() -> SparseAutoencoder:
    return SparseAutoencoder(SAEConfig(d_in=D, n_latents=M, k=K), **random_weights(D, M))


# -- native files ---------------------------------------------------------------------------------------


@given(st.data())
def test_native_metadata_and_tensors(data):
    with tempfile.TemporaryDirectory() as tmp:
        good = save_native(good_sae(), Path(tmp) / "good.safetensors")
        from safetensors import safe_open

        with safe_open(str(good), "pt") as f:
            meta = dict(f.metadata())
            ts = {k: f.get_tensor(k) for k in f.keys()}
        cfg = mutate_dict(json.loads(meta["config"]), data.draw)
        meta["config"] = data.draw(st.sampled_from([json.dumps(cfg), json.dumps(data.draw(json_values))]))
        if data.draw(st.booleans()):
            meta["format_version"] = data.draw(st.text(max_size=4))
        ts = mutate_tensors(ts, data.draw)
        path = Path(tmp) / "x.safetensors"
        save_file({k: v.contiguous() for k, v in ts.items()}, str(path), metadata=meta)
        only_pack_errors(lambda: load_sae(path))


@given(st.binary(max_size=300), st.sampled_from(["x.safetensors", "sae.safetensors", "x.bin"]))
def test_random_bytes_files(blob, name):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(blob)
        only_pack_errors(lambda: load_sae(path))
        only_pack_errors(lambda: load_concepts(path))


@given(st.data())
def test_truncated_or_flipped_native_file(data):
    with tempfile.TemporaryDirectory() as tmp:
        good = save_native(good_sae(), Path(tmp) / "good.safetensors").read_bytes()
        cut = data.draw(st.integers(0, len(good)))
        blob = bytearray(good[:cut])
        for _ in range(data.draw(st.integers(0, 3))):
            if blob:
                i = data.draw(st.integers(0, len(blob) - 1))
                blob[i] = data.draw(st.integers(0, 255))
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(bytes(blob))
        only_pack_errors(lambda: load_sae(path))


# -- directory formats ----------------------------------------------------------------------------------


def rewrite_safetensors(path: Path, draw) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v.contiguous() for k, v in mutate_tensors(ts, draw).items()}, str(path))


@given(st.data())
def test_sparsify_directories(data):
    with tempfile.TemporaryDirectory() as tmp:
        d = write_sparsify(Path(tmp) / "up_blocks.1.attentions.1", random_weights(D, M), k=K, saeuron=True)
        raw = json.loads((d / "cfg.json").read_text())
        (d / "cfg.json").write_text(json.dumps(mutate_dict(raw, data.draw)))
        rewrite_safetensors(d / "sae.safetensors", data.draw)
        only_pack_errors(lambda: load_sae(d))


@given(st.data())
def test_saelens_directories(data):
    with tempfile.TemporaryDirectory() as tmp:
        arch = data.draw(st.sampled_from(["standard", "topk", "jumprelu"]))
        d = write_saelens(Path(tmp) / "lens", random_weights(D, M), architecture=arch, k=K if arch == "topk" else None,
                          threshold=torch.rand(M) if arch == "jumprelu" else None)
        raw = json.loads((d / "cfg.json").read_text())
        (d / "cfg.json").write_text(json.dumps(mutate_dict(raw, data.draw)))
        rewrite_safetensors(d / "sae_weights.safetensors", data.draw)
        only_pack_errors(lambda: load_sae(d))


torch_values = st.recursive(
    st.none() | st.integers(-5, 50) | st.text(max_size=6) | st.sampled_from(["TopK", "ReLU"]) | tensors(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["k", "state_dict", "x"]), inner, max_size=3),
    max_leaves=6,
)


@given(st.data())
def test_unbox_directories(data):
    with tempfile.TemporaryDirectory() as tmp:
        d = write_unbox(Path(tmp) / "unbox", random_weights(D, M), k=K, openai_extras=data.draw(st.booleans()))
        raw = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(mutate_dict(raw, data.draw)))
        state = torch.load(d / "state_dict.pth", weights_only=True)["state_dict"]
        for key in data.draw(st.lists(st.sampled_from(sorted(state) + ["activation", "activation_state_dict"]),
                                      max_size=3, unique=True)):
            state[key] = data.draw(torch_values)
        blob = data.draw(st.sampled_from(["wrapped", "bare", "other"]))
        obj = {"state_dict": state} if blob == "wrapped" else state if blob == "bare" else data.draw(torch_values)
        torch.save(obj, d / "state_dict.pth")
        if data.draw(st.booleans()):
            torch.save(data.draw(torch_values), d / "mean.pt")
        only_pack_errors(lambda: load_sae(d))


class Payload:
    def __reduce__(self):  # would run if anything unpickled it
        return (Path.write_text, (Path(tempfile.gettempdir()) / "sae_fuzz_pwned", "x"))


def test_pickle_payload_never_runs():
    with tempfile.TemporaryDirectory() as tmp:
        d = write_unbox(Path(tmp) / "unbox", random_weights(D, M), k=K)
        (d / "state_dict.pth").write_bytes(pickle.dumps({"state_dict": Payload()}))
        (d / "mean.pt").write_bytes(pickle.dumps(Payload()))
        with pytest.raises(SAEError, match="safe loading refuses"):
            load_sae(d)
    assert not (Path(tempfile.gettempdir()) / "sae_fuzz_pwned").exists()


MARKERS = ["cfg.json", "sae.safetensors", "sae_weights.safetensors", "config.json", "state_dict.pth", "mean.pt"]


@given(st.lists(st.tuples(st.sampled_from(MARKERS + ["sub"]), st.sampled_from(["file", "dir", "garbage"])),
                max_size=5, unique_by=lambda x: x[0]), st.integers(0, 2))
def test_format_detection_on_any_layout(entries, depth):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ck"
        where = root
        for level in range(depth):
            where = where / f"level{level}"
        where.mkdir(parents=True)
        for name, kind in entries:
            if kind == "dir":
                (where / name).mkdir()
            else:
                (where / name).write_bytes(b"{}" if kind == "file" else os.urandom(16))
        only_pack_errors(lambda: detect_format(root))
        only_pack_errors(lambda: load_sae(root))


# -- concept files --------------------------------------------------------------------------------------


@given(st.data())
def test_concept_files(data):
    with tempfile.TemporaryDirectory() as tmp:
        good = Path(tmp) / "good.safetensors"
        ConceptDictionary.from_latents([1, 4], M, threshold=0.5, means=[1.0, 2.0], sae_fingerprint="0123456789abcdef").save(good)
        from safetensors import safe_open

        with safe_open(str(good), "pt") as f:
            meta = dict(f.metadata())
            ts = {k: f.get_tensor(k) for k in f.keys()}
        header = mutate_dict(json.loads(meta["sae_concepts"]), data.draw)
        meta["sae_concepts"] = data.draw(st.sampled_from([json.dumps(header), json.dumps(data.draw(json_values)), "{"]))
        ts = mutate_tensors(ts, data.draw)
        path = Path(tmp) / "c.safetensors"
        path.write_bytes(save({k: v.contiguous() for k, v in ts.items()}, metadata=meta))
        only_pack_errors(lambda: load_concepts(path))
        only_pack_errors(lambda: load_concepts(path, sae=good_sae()))


# -- values and names from the nodes and settings ---------------------------------------------------------


@given(st.text(max_size=300))
def test_node_names_and_entries(text):
    from nodes import folders, learn

    class Folders:
        def __init__(self, root):
            self.models_dir = root
            self.folder_names_and_paths = {}

        def get_folder_paths(self, name):
            return list(self.folder_names_and_paths[name][0])

        def get_full_path(self, name, rel):
            for p in self.folder_names_and_paths[name][0]:
                full = os.path.join(p, rel)
                if os.path.isfile(full):
                    return full
            return None

    with tempfile.TemporaryDirectory() as tmp:
        f = Folders(tmp)
        folders.register(f)
        only_pack_errors(lambda: folders.concept_save_path(f, text))
        only_pack_errors(lambda: folders.resolve_sae_entry(f, text))
        only_pack_errors(lambda: folders.resolve_sae_entry(f, text + "/"))
        only_pack_errors(lambda: learn.parse_latent_ids(text))


@given(st.data())
def test_settings_constructors(data):
    from sae_core.detect import DetectionSettings
    from sae_core.intervention import ReplaceSettings, StepInfo
    from sae_core.selection import SelectionRule
    from sae_core.steer import SteerSettings

    v = json_values | st.floats()
    for cls, fields in ((DetectionSettings, ("threshold_scale", "padding", "min_region", "min_share")),
                        (SteerSettings, ("method", "strength", "error", "detected_only", "use_beta", "cfg_sign")),
                        (ReplaceSettings, ("mode", "seed", "target", "fill_values")),
                        (SelectionRule, ("method", "percentile", "top_n", "fixed_threshold", "max_ratio", "min_rate")),
                        (StepInfo, ("timestep", "sigma", "chunks", "step_index"))):
        kwargs = {k: data.draw(v) for k in data.draw(st.lists(st.sampled_from(fields), max_size=3, unique=True))}
        if cls is StepInfo:
            kwargs.setdefault("timestep", 1.0)
        only_pack_errors(lambda cls=cls, kwargs=kwargs: cls(**kwargs))
    ids = data.draw(st.lists(json_values, max_size=3))
    only_pack_errors(lambda: ConceptDictionary.from_latents(ids, M, threshold=data.draw(v)))
