"""A real ComfyUI server (127.0.0.1, started and stopped here) loads the pack and runs graphs of its nodes.

The pack is linked into a temporary --base-directory (custom_nodes, models/sae, models/sae_concepts),
so nothing is written into the ComfyUI checkout. Every wait is bounded.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
COMFYUI_PATH = os.environ["COMFYUI_PATH"]
NODE_IDS = {"SAELoad", "SAEConceptDetector", "SAEPatchReplacer", "SAESteer", "SAEMaskPreview", "SAELearnConcept",
            "SAESaveConcept", "SAELoadConcept", "SAECompare"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url, payload, timeout=10):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _write_models(base: pathlib.Path, pack):
    sc = pack.sae_core
    g = torch.Generator().manual_seed(0)

    def sae(seed):
        g.manual_seed(seed)
        W_dec = torch.randn(32, 1280, generator=g)  # the real SD1 width: load_sae checks family/hook against it
        cfg = sc.SAEConfig(d_in=1280, n_latents=32, k=4, hook_point="up_blocks.1.attentions.1", model_family="sd1")
        return sc.SparseAutoencoder(cfg, W_enc=torch.randn(32, 1280, generator=g), b_enc=torch.zeros(32),
                                    W_dec=W_dec / W_dec.norm(dim=-1, keepdim=True), b_dec=torch.zeros(1280))

    (base / "models" / "sae").mkdir(parents=True)
    (base / "models" / "sae_concepts").mkdir(parents=True)
    a, b = sae(1), sae(2)
    sc.save_native(a, base / "models" / "sae" / "tiny.safetensors")
    sc.save_native(b, base / "models" / "sae" / "other.safetensors")
    # for the tiny UNet (128 channels at output_blocks.4.1): no family recorded, so load_sae keeps the hook
    # point without checking it against the real SD1 width; the node checks the real model's width
    g.manual_seed(3)
    W_dec = torch.randn(64, 128, generator=g)
    cfg = sc.SAEConfig(d_in=128, n_latents=64, k=8, hook_point="up_blocks.1.attentions.1")
    tiny = sc.SparseAutoencoder(cfg, W_enc=torch.randn(64, 128, generator=g) / 128**0.5, b_enc=torch.zeros(64),
                                W_dec=W_dec / W_dec.norm(dim=-1, keepdim=True), b_dec=torch.zeros(128))
    sc.save_native(tiny, base / "models" / "sae" / "tiny_unet.safetensors")
    concept = sc.concepts.ConceptDictionary.from_latents([3, 5], 32, threshold=0.1, name="cat",
                                                         sae_fingerprint=a.fingerprint())
    concept.save(base / "models" / "sae_concepts" / "cat.safetensors")


@pytest.fixture(scope="module")
def server(tmp_path_factory, pack):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "sae_concept_eraser")
    os.symlink(HERE / "helper_nodes.py", base / "custom_nodes" / "sae_test_helpers.py")
    _write_models(base, pack)
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--use-pytorch-cross-attention", "--listen", "127.0.0.1",
         "--port", str(port), "--base-directory", str(base), "--disable-auto-launch"],
        cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{(base / 'server.log').read_text()[-4000:]}")
            try:
                _get(url + "/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail("ComfyUI did not answer within 180 s:\n" + (base / "server.log").read_text()[-4000:])
                time.sleep(1)
        yield url, base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def _run(url, graph, timeout=120):
    client = uuid.uuid4().hex
    status, body = _post(url + "/prompt", {"prompt": graph, "client_id": client})
    if status != 200:
        return status, body
    pid = body["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hist = _get(f"{url}/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            if hist[pid]["status"]["status_str"] in ("success", "error"):
                return 200, hist[pid]
        time.sleep(0.5)
    pytest.fail(f"prompt {pid} did not finish within {timeout} s")


def test_nodes_registered_with_schema(server):
    url, _ = server
    info = _get(url + "/object_info")
    assert NODE_IDS <= set(info)
    for nid in NODE_IDS:
        node = info[nid]
        assert node["category"].split("/")[0] == "SAE" and node["description"]
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{nid}.{name} has no tooltip"
    assert "tiny.safetensors" in info["SAELoad"]["input"]["required"]["sae_name"][1]["options"]
    # optional with 0 = off, so prompts saved before it existed (the graphs below) still validate and run
    share = info["SAEConceptDetector"]["input"]["optional"]["min_share"]
    assert share[0] == "FLOAT" and (share[1]["default"], share[1]["min"], share[1]["max"]) == (0.0, 0.0, 1.0)


def test_graph_runs_and_wrong_graph_reports(server):
    url, base = server
    load = {"class_type": "SAELoad", "inputs": {"sae_name": "tiny.safetensors", "block": "from file",
                                                 "model_family": "from file", "input_space": "from file",
                                                 "activation": "from file"}}
    graph = {
        "1": load,
        "2": {"class_type": "SAELoadConcept", "inputs": {"concept_name": "cat.safetensors", "sae": ["1", 0]}},
        "3": {"class_type": "SAEConceptDetector", "inputs": {
            "sae": ["1", 0], "concept": ["2", 0], "latent_ids": "7", "typed_threshold": 0.0, "threshold_scale": 1.0,
            "padding": 1, "min_region": 0, "start_percent": 0.0, "end_percent": 1.0, "branches": "both",
            "presence_gate": True, "temporal": "none"}},
        "4": {"class_type": "SAESaveConcept", "inputs": {"concept": ["2", 0], "filename": "copy", "overwrite": True}},
        "5": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}},
        "6": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 16777215}},
        "7": {"class_type": "SAECompare", "inputs": {"image_a": ["5", 0], "image_b": ["6", 0], "label_a": "a",
                                                     "label_b": "b", "label_c": "c"}},
    }
    status, hist = _run(url, graph)
    assert status == 200 and hist["status"]["status_str"] == "success", hist["status"]["messages"][-1][1].get("exception_message")
    assert (base / "models" / "sae_concepts" / "copy.safetensors").is_file()
    images = hist["outputs"]["7"]["images"]
    assert len(images) == 1 and images[0]["type"] == "temp"
    assert "saved ['cat']" in "".join(hist["outputs"]["4"]["text"])

    # execution error: the concept was learned with another SAE
    wrong = dict(graph)
    wrong["1"] = {**load, "inputs": {**load["inputs"], "sae_name": "other.safetensors"}}
    status, hist = _run(url, wrong)
    assert status == 200 and hist["status"]["status_str"] == "error"
    err = [m[1] for m in hist["status"]["messages"] if m[0] == "execution_error"][0]
    assert err["node_type"] == "SAELoadConcept" and err["exception_type"] == "sae_core.ConceptMismatchError"
    assert "cat.safetensors" in err["exception_message"]

    # V3 combos are not checked against their options by this ComfyUI's validation: Load SAE reports it
    gone = {"1": {**load, "inputs": {**load["inputs"], "sae_name": "missing.safetensors"}},
            "2": graph["2"], "4": graph["4"]}
    status, hist = _run(url, gone)
    err = [m[1] for m in hist["status"]["messages"] if m[0] == "execution_error"][0]
    assert err["node_type"] == "SAELoad" and err["exception_type"] == "sae_core.SAEFileNotFoundError"
    assert "'missing.safetensors' not found under models/sae" in err["exception_message"]

    # validation error: an SAE wired into an IMAGE input never starts executing
    bad = {"1": load, "5": graph["5"],
           "7": {**graph["7"], "inputs": {**graph["7"]["inputs"], "image_b": ["1", 0]}}}
    status, body = _post(url + "/prompt", {"prompt": bad})
    assert status == 400, body
    errs = body["node_errors"]["7"]["errors"]
    assert errs[0]["type"] == "return_type_mismatch" and "SAE" in json.dumps(errs) and "IMAGE" in json.dumps(errs)


def test_sampling_graph_with_ksampler_mask_preview_and_wrong_width(server):
    url, base = server

    def load(name):
        return {"class_type": "SAELoad", "inputs": {"sae_name": name, "block": "from file", "model_family": "from file",
                                                     "input_space": "from file", "activation": "from file"}}

    graph = {
        "m": {"class_type": "SAETestTinySD1", "inputs": {}},
        "c": {"class_type": "SAETestConds", "inputs": {"seed": 3}},
        "l": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 96, "batch_size": 2}},
        "s": load("tiny_unet.safetensors"),
        "d": {"class_type": "SAEConceptDetector", "inputs": {
            "sae": ["s", 0], "latent_ids": "1, 2, 3, 4, 5, 6", "typed_threshold": 0.0, "threshold_scale": 1.0,
            "padding": 0, "min_region": 0, "start_percent": 0.0, "end_percent": 1.0, "branches": "both",
            "presence_gate": True, "temporal": "none"}},
        "p": {"class_type": "SAEPatchReplacer", "inputs": {"model": ["m", 0], "detector": ["d", 0], "mode": "random",
                                                           "target": "output", "seed": 0, "look_ahead": False}},
        "k0": {"class_type": "KSampler", "inputs": {"model": ["m", 0], "seed": 5, "steps": 3, "cfg": 4.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "positive": ["c", 0],
                                                    "negative": ["c", 1], "latent_image": ["l", 0], "denoise": 1.0}},
        "k1": {"class_type": "KSampler", "inputs": {"model": ["p", 0], "seed": 5, "steps": 3, "cfg": 4.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "positive": ["c", 0],
                                                    "negative": ["c", 1], "latent_image": ["l", 0], "denoise": 1.0}},
        "i0": {"class_type": "SAETestLatentToImage", "inputs": {"samples": ["k0", 0]}},
        "i1": {"class_type": "SAETestLatentToImage", "inputs": {"samples": ["k1", 0]}},
        "mp": {"class_type": "SAEMaskPreview", "inputs": {"detections": ["p", 1], "images": ["i1", 0], "step": -1,
                                                          "aggregate": "max", "branch": "cond", "show": "mask",
                                                          "opacity": 0.5, "color": "#ff2020"}},
        "cmp": {"class_type": "SAECompare", "inputs": {"image_a": ["i0", 0], "image_b": ["mp", 0], "label_a": "original",
                                                       "label_b": "PER + mask", "label_c": ""}},
    }
    status, hist = _run(url, graph, timeout=240)
    assert status == 200 and hist["status"]["status_str"] == "success", hist if status != 200 else hist["status"]["messages"][-1]
    assert len(hist["outputs"]["mp"]["images"]) == 2 and len(hist["outputs"]["cmp"]["images"]) == 2

    wrong = {k: v for k, v in graph.items() if k not in ("mp", "cmp", "i0", "k0")}
    wrong["pv"] = {"class_type": "PreviewImage", "inputs": {"images": ["i1", 0]}}  # an output node
    wrong["s"] = load("tiny.safetensors")  # 1280 wide: the real SD1 width, not the tiny UNet's 128
    # the detector runs (with min_share) before the replacer finds the wrong width
    wrong["d"] = {**graph["d"], "inputs": {**graph["d"]["inputs"], "latent_ids": "1", "min_share": 0.2}}
    status, hist = _run(url, wrong, timeout=240)
    assert status == 200 and hist["status"]["status_str"] == "error"
    err = [m[1] for m in hist["status"]["messages"] if m[0] == "execution_error"][0]
    # the pack's own type, shown by ComfyUI under the clean module name
    assert err["node_type"] == "SAEPatchReplacer" and err["exception_type"] == "sae_core.BlockMismatchError"
    msg = err["exception_message"]
    for part in ("tiny.safetensors", "up_blocks.1.attentions.1", "diffusion_model.output_blocks.4.1",
                 "has 128 channels in this model", "expects d_in=1280"):
        assert part in msg, msg
    assert "k1" not in err["executed"] and "d" in err["executed"]  # failed before sampling, after the detector
