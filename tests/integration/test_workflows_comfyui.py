"""Example workflows against a real ComfyUI server (127.0.0.1, started and stopped here): the stored schema snapshot
equals the live node definitions, every workflow's widgets fit them, and every workflow converted to API format is
accepted by POST /prompt validation (model files exist as placeholders in a temporary models folder)."""

import json
import os
import pathlib
import sys
import time

import pytest

from tools import build_workflows, workflow_format
from tools.comfy_server import comfy_server, get_json, post_json
from tools.snapshot_schemas import CORE_NODES, OUR_NODES, render

ROOT = pathlib.Path(__file__).resolve().parents[2]
WF_DIR = ROOT / "example_workflows"
NAMES = sorted(build_workflows.BUILDERS)


def _workflows():
    return {n: json.loads((WF_DIR / f"{n}.json").read_text()) for n in NAMES}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_wf")
    schemas = workflow_format.load_snapshot()
    for wf in _workflows().values():
        for folder, names in workflow_format.files_expected(wf, schemas).items():
            for name in names:
                p = base / "models" / folder / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()  # validation checks names only; execution then fails at the loader (see below)
    with comfy_server(base, sys.executable, os.environ["COMFYUI_PATH"]) as url:
        yield url, get_json(url + "/object_info", timeout=60)


def test_snapshot_matches_live_schemas(server):
    _, info = server
    live = workflow_format.snapshot_schemas(info, OUR_NODES + CORE_NODES)
    stored = workflow_format.load_snapshot()
    assert render(live) == render(stored), (
        "tests/data/node_schemas.json is out of date with this ComfyUI / the pack's nodes: run "
        "COMFYUI_PATH=... python tools/snapshot_schemas.py, then python tools/build_workflows.py"
    )


def test_live_file_lists_contain_the_expected_models(server):
    _, info = server
    assert "sd_xl_turbo_1.0_fp16.safetensors" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "sdxl_unbox_down.2.1.safetensors" in info["SAELoad"]["input"]["required"]["sae_name"][1]["options"]


@pytest.mark.parametrize("name", NAMES)
def test_workflow_fits_live_schemas_and_validates(server, name):
    url, info = server
    wf = _workflows()[name]
    live = workflow_format.snapshot_schemas(info, {n["type"] for n in wf["nodes"]} - workflow_format.FRONTEND_ONLY)
    workflow_format.check_workflow(wf, live, name)
    prompt = workflow_format.to_api(wf, live)
    status, body = post_json(url + "/prompt", {"prompt": prompt, "client_id": "sae-workflow-test"})
    assert status == 200 and body.get("node_errors") == {}, json.dumps(body)[:2000]
    # accepted: it now runs and stops at the first loader of a placeholder file; wait so runs do not pile up
    pid = body["prompt_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        hist = get_json(f"{url}/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"{name}: prompt {pid} did not finish within 120 s")
    errs = [m[1] for m in hist[pid]["status"]["messages"] if m[0] == "execution_error"]
    assert hist[pid]["status"]["status_str"] == "error" and errs
    assert errs[0]["node_type"] in ("CheckpointLoaderSimple", "SAELoad"), errs[0]


def test_wrong_widget_is_rejected_by_server_validation(server):
    """The check is not vacuous: the same conversion with a bad core widget value gets a node error."""
    url, info = server
    wf = _workflows()["sdxl_turbo_object_erasure"]
    live = workflow_format.snapshot_schemas(info, {n["type"] for n in wf["nodes"]} - workflow_format.FRONTEND_ONLY)
    prompt = workflow_format.to_api(wf, live)
    ks = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    prompt[ks]["inputs"]["sampler_name"] = "no_such_sampler"
    status, body = post_json(url + "/prompt", {"prompt": prompt})
    assert status == 400 and body["node_errors"][ks]["errors"][0]["type"] == "value_not_in_list"


def test_served_as_custom_node_templates_with_thumbnails(server):
    """ComfyUI lists example_workflows/ under the pack's folder name and serves the JSON and .jpg files."""
    import urllib.request

    from tools.comfy_server import PACK_LINK

    url, _ = server
    templates = get_json(url + "/workflow_templates")
    assert sorted(templates[PACK_LINK]) == NAMES
    for name in NAMES:
        for ext, check in ((".json", lambda b: json.loads(b)["nodes"]), (".jpg", lambda b: b[:3] == b"\xff\xd8\xff")):
            with urllib.request.urlopen(f"{url}/api/workflow_templates/{PACK_LINK}/{name}{ext}", timeout=10) as r:
                assert r.status == 200 and check(r.read())
