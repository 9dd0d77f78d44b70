"""Example workflows without ComfyUI: frontend format, node types, links, widget values against the schema snapshot,
models lists, thumbnails, UI -> API conversion. tests/integration/test_workflows_comfyui.py checks the snapshot
against the real node definitions and queues every workflow on a real server."""

import copy
import json
import pathlib
import re

import pytest
from PIL import Image

from tools import build_workflows, workflow_format
from tools.workflow_format import WorkflowError, check_workflow, load_snapshot, to_api, widget_values

ROOT = pathlib.Path(__file__).resolve().parents[1]
WF_DIR = ROOT / "example_workflows"
NAMES = sorted(build_workflows.BUILDERS)


@pytest.fixture(scope="module")
def schemas():
    return load_snapshot()


def _load(name):
    return json.loads((WF_DIR / f"{name}.json").read_text())


def test_exactly_the_five_workflows_each_with_a_thumbnail():
    assert sorted(p.stem for p in WF_DIR.glob("*.json")) == NAMES
    for name in NAMES:
        jpg = WF_DIR / f"{name}.jpg"
        assert jpg.is_file(), f"{jpg} missing: run tools/browser_check.py --thumbnails"
        with Image.open(jpg) as im:
            assert im.format == "JPEG" and min(im.size) >= 128


def test_snapshot_has_every_node_of_the_pack(schemas):
    source = "".join((ROOT / "nodes" / f"{m}_nodes.py").read_text() for m in ("sae", "edit", "preview", "concept"))
    ours = set(re.findall(r'node_id="(SAE\w+)"', source))
    assert len(ours) == 9 and ours <= set(schemas)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_valid(name, schemas):
    wf = _load(name)
    check_workflow(wf, schemas, name)
    types = {n["type"] for n in wf["nodes"]}
    assert types <= set(schemas) | workflow_format.FRONTEND_ONLY
    assert any(t.startswith("SAE") for t in types)
    # a note tells how to convert the published SAE into models/sae (the training workflow makes its own SAE)
    assert name == "train_your_own_sae" or any(
        n["type"] == "MarkdownNote" and "python custom_nodes/sae-concept-eraser convert" in n["widgets_values"][0]
        for n in wf["nodes"])


@pytest.mark.parametrize("name", NAMES)
def test_file_is_what_the_builder_writes(name, schemas):
    assert _load(name) == json.loads(json.dumps(build_workflows.BUILDERS[name](schemas)))


@pytest.mark.parametrize("name", NAMES)
def test_models_name_checkpoint_and_sae_sources(name, schemas):
    wf = _load(name)
    dirs = {m["directory"] for m in wf["models"]}
    # every workflow loads a checkpoint; all but the training one (which makes its SAE) load an SAE too
    assert dirs == ({"checkpoints"} if name == "train_your_own_sae" else {"checkpoints", "sae"})
    expected = workflow_format.files_expected(wf, schemas)
    assert {m["name"] for m in wf["models"]} == expected["checkpoints"] | expected.get("sae", set())
    for m in wf["models"]:
        if m["directory"] == "checkpoints":
            assert m["url"].startswith("https://huggingface.co/") and m["url"].endswith(m["name"])


def test_the_issue_s_five_scenarios(schemas):
    def types(name):
        return [n["type"] for n in _load(name)["nodes"]]

    one = types("sdxl_turbo_object_erasure")
    assert "SAEPatchReplacer" in one and "SAEMaskPreview" in one
    assert _load("sdxl_turbo_object_erasure")["models"][0]["name"] == "sd_xl_turbo_1.0_fp16.safetensors"
    two = _load("compare_steer_vs_replace")
    assert {"SAESteer", "SAEPatchReplacer", "SAECompare"} <= {n["type"] for n in two["nodes"]}
    seeds = {widget_values(schemas["KSampler"], n["widgets_values"], "k")["seed"]
             for n in two["nodes"] if n["type"] == "KSampler"}
    assert len(seeds) == 1 and sum(t == "KSampler" for t in types("compare_steer_vs_replace")) == 3
    three = _load("sd15_style_erasure_saeuron")
    assert any(m["url"] == "https://huggingface.co/bcywinski/SAeUron" for m in three["models"])
    assert {"SAELearnConcept", "SAESaveConcept"} <= set(types("learn_and_save_concept"))
    five = _load("two_concepts_at_once")
    det = next(n for n in five["nodes"] if n["type"] == "SAEConceptDetector")
    assert {i["name"] for i in det["inputs"] if i["link"] is not None} >= {"concept", "concept_2"}


@pytest.mark.parametrize("name", NAMES)
def test_to_api(name, schemas):
    wf = _load(name)
    prompt = to_api(wf, schemas)
    real = [n for n in wf["nodes"] if n["type"] not in workflow_format.FRONTEND_ONLY]
    assert sorted(prompt) == sorted(str(n["id"]) for n in real)
    for nid, entry in prompt.items():
        schema = schemas[entry["class_type"]]
        required = {k for k, s in schema["inputs"].items() if s["section"] == "required"}
        assert required <= set(entry["inputs"]), (nid, required - set(entry["inputs"]))
        for k, v in entry["inputs"].items():
            if isinstance(v, list):
                src = prompt[v[0]]
                assert schemas[src["class_type"]]["output"][v[1]] == schema["inputs"][k]["type"]
    # the control value of a seed never reaches the API prompt
    for ks in (e for e in prompt.values() if e["class_type"] == "KSampler"):
        assert ks["inputs"]["seed"] == 42 and "control_after_generate" not in ks["inputs"]


# ------------------------------------------------------------------------------------------ bad workflows


@pytest.fixture
def wf():
    return _load("sdxl_turbo_object_erasure")


def _node(wf, type_):
    return next(n for n in wf["nodes"] if n["type"] == type_)


def test_bad_unknown_node(wf, schemas):
    _node(wf, "SaveImage")["type"] = "SomeCustomNode"
    with pytest.raises(WorkflowError, match=r"node \d+ \(SomeCustomNode\): unknown node type"):
        check_workflow(wf, schemas)


def test_bad_link_type(wf, schemas):
    mp = _node(wf, "SAEMaskPreview")
    lid = next(i["link"] for i in mp["inputs"] if i["name"] == "detections")
    link = next(link for link in wf["links"] if link[0] == lid)
    dec = _node(wf, "VAEDecode")
    link[1], link[2] = dec["id"], 0  # an IMAGE into the DETECTIONS input
    dec["outputs"][0]["links"].append(lid)
    with pytest.raises(WorkflowError, match=r"types IMAGE -> SAE_DETECTIONS"):
        check_workflow(wf, schemas)


def test_bad_link_one_sided(wf, schemas):
    _node(wf, "SAEMaskPreview")["inputs"][0]["link"] = None
    with pytest.raises(WorkflowError, match="not recorded on both ends"):
        check_workflow(wf, schemas)


def test_bad_widget_count(wf, schemas):
    _node(wf, "SAEPatchReplacer")["widgets_values"].append("fixed")
    with pytest.raises(WorkflowError, match=r"8 widgets_values, expected 7 for \['mode', 'target', 'seed', 'look_ahead', 'denoised_fill', 'keep_rest', 'hole'\]"):
        check_workflow(wf, schemas)


def test_bad_combo_value(wf, schemas):
    _node(wf, "SAEPatchReplacer")["widgets_values"][0] = "median"
    with pytest.raises(WorkflowError, match=r"widget 'mode' is 'median', expected one of \['random'"):
        check_workflow(wf, schemas)


def test_bad_range(wf, schemas):
    _node(wf, "SAEMaskPreview")["widgets_values"][4] = 1.5  # opacity
    with pytest.raises(WorkflowError, match=r"widget 'opacity' is 1.5, expected 0.0..1.0"):
        check_workflow(wf, schemas)


def test_bad_type(wf, schemas):
    _node(wf, "SAEConceptDetector")["widgets_values"][3] = "1"  # padding
    with pytest.raises(WorkflowError, match=r"widget 'padding' is '1', expected a INT value"):
        check_workflow(wf, schemas)


def test_bad_control_value(wf, schemas):
    k = _node(wf, "KSampler")
    k["widgets_values"][1] = "sometimes"
    with pytest.raises(WorkflowError, match=r"control value after 'seed' is 'sometimes'"):
        check_workflow(wf, schemas)


def test_bad_unconnected_required(wf, schemas):
    mp = _node(wf, "SAEMaskPreview")
    lid = mp["inputs"][1]["link"]
    mp["inputs"][1]["link"] = None
    wf["links"] = [link for link in wf["links"] if link[0] != lid]
    for n in wf["nodes"]:
        for o in n["outputs"] or []:
            if o.get("links") and lid in o["links"]:
                o["links"].remove(lid)
    with pytest.raises(WorkflowError, match=r"required input 'images' \(IMAGE\) is not connected"):
        check_workflow(wf, schemas)


def test_bad_model_not_listed(wf, schemas):
    wf["models"] = [m for m in wf["models"] if m["directory"] != "sae"]
    with pytest.raises(WorkflowError, match=r"expects sae/sdxl_unbox_down.2.1.safetensors but the top-level models"):
        check_workflow(wf, schemas)


def test_bad_model_entry(wf, schemas):
    wf["models"][0] = {"name": "x.safetensors", "url": "ftp://example.org/x", "directory": "checkpoints"}
    with pytest.raises(WorkflowError, match="needs name, https url and directory"):
        check_workflow(wf, schemas)


def test_bad_top_level(wf, schemas):
    bad = copy.deepcopy(wf)
    del bad["version"]
    with pytest.raises(WorkflowError, match="top-level 'version'"):
        check_workflow(bad, schemas)
    wf["last_node_id"] = 1
    with pytest.raises(WorkflowError, match="last_node_id 1 is below the largest node id"):
        check_workflow(wf, schemas)


def test_bad_snapshot_missing_node():
    with pytest.raises(KeyError, match="node type 'SAENope' is not in /object_info"):
        workflow_format.snapshot_schemas({}, ["SAENope"])
