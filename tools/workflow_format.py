"""ComfyUI UI-format workflows (what the frontend saves): schema snapshot, structure/type/widget checks, UI -> API.

Pure Python (json only). The rules follow the frontend's own workflow schema (zComfyWorkflow, version 0.4, in
comfyui-frontend-package 1.27) and its widget construction: widgets are the inputs of a widget type (INT, FLOAT,
STRING, BOOLEAN, COMBO or an option list) in input_order (required, then optional); an INT with
control_after_generate (or, when that is unset, named seed / noise_seed) is followed by one control value.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Nodes that exist only in the frontend (never sent to the server).
FRONTEND_ONLY = {"Note", "MarkdownNote"}
# Combo inputs whose options are the files present (not part of the snapshot); a value must end with one of these.
FILE_COMBOS = {
    ("CheckpointLoaderSimple", "ckpt_name"): ("checkpoints", (".safetensors", ".ckpt", ".sft")),
    ("SAELoad", "sae_name"): ("sae", (".safetensors", "/")),
    ("SAELoadConcept", "concept_name"): ("sae_concepts", (".safetensors",)),
}
SPEC_KEYS = ("default", "min", "max", "step", "round", "options", "control_after_generate", "multiline")
MODEL_DIRS = {"checkpoints", "sae", "sae_concepts", "vae", "loras"}

SNAPSHOT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "node_schemas.json"


class WorkflowError(ValueError):
    """A workflow file breaks the format, a link or a widget value; the message names the file and node."""


# ------------------------------------------------------------------------------------------------ schemas


def snapshot_schemas(object_info: dict, node_types) -> dict:
    """The parts of /object_info the checks need, for ``node_types``; file lists emptied (they vary per install)."""
    out = {}
    for t in sorted(node_types):
        if t not in object_info:
            raise KeyError(f"node type {t!r} is not in /object_info; is the pack installed and ComfyUI new enough?")
        info = object_info[t]
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                kind = spec[0]
                opts = {k: v for k, v in (spec[1] if len(spec) > 1 else {}).items() if k in SPEC_KEYS}
                if (t, name) in FILE_COMBOS:
                    kind, opts = "COMBO", {**opts, "options": []}
                elif isinstance(kind, list):
                    kind, opts = "COMBO", {**opts, "options": list(kind)}
                inputs[name] = {"type": kind, "section": section, **opts}
        order = [n for s in ("required", "optional") for n in info.get("input_order", {}).get(s, [])]
        out[t] = {"inputs": inputs, "input_order": order or list(inputs), "output": list(info["output"]),
                  "output_name": list(info["output_name"])}
    return out


def load_snapshot(path: pathlib.Path = SNAPSHOT) -> dict:
    return json.loads(pathlib.Path(path).read_text())


def widgets_of(schema: dict) -> list[tuple[str, dict, bool]]:
    """[(input name, spec, has a control value after it)] in the frontend's widget order."""
    out = []
    for name in schema["input_order"]:
        spec = schema["inputs"][name]
        if spec["type"] not in WIDGET_TYPES:
            continue
        control = spec["type"] == "INT" and spec.get("control_after_generate",
                                                     name in ("seed", "noise_seed")) is True
        out.append((name, spec, control))
    return out


def widget_values(schema: dict, values: list, where: str) -> dict[str, Any]:
    """Map a node's widgets_values onto input names, checking count, types, ranges and options."""
    expected = widgets_of(schema)
    n = sum(2 if c else 1 for _, _, c in expected)
    if len(values) != n:
        names = [nm + (" (+control)" if c else "") for nm, _, c in expected]
        raise WorkflowError(f"{where}: {len(values)} widgets_values, expected {n} for {names}")
    out, i = {}, 0
    for name, spec, control in expected:
        v = values[i]
        _check_value(spec, v, f"{where} widget {name!r}", where)
        out[name] = v
        i += 1
        if control:
            if values[i] not in CONTROL_VALUES:
                raise WorkflowError(f"{where}: control value after {name!r} is {values[i]!r}, expected one of "
                                    f"{sorted(CONTROL_VALUES)}")
            i += 1
    return out


def _check_value(spec: dict, v, what: str, where: str) -> None:
    t = spec["type"]
    if t == "COMBO":
        opts = spec.get("options", [])
        if opts and v not in opts:
            raise WorkflowError(f"{what} is {v!r}, expected one of {opts}")
        if not isinstance(v, str):
            raise WorkflowError(f"{what} is {v!r}, expected a string option")
        return
    if t == "INT":
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif t == "FLOAT":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    elif t == "STRING":
        ok = isinstance(v, str)
    else:  # BOOLEAN
        ok = isinstance(v, bool)
    if not ok:
        raise WorkflowError(f"{what} is {v!r}, expected a {t} value")
    if t in ("INT", "FLOAT"):
        lo, hi = spec.get("min"), spec.get("max")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise WorkflowError(f"{what} is {v}, expected {lo}..{hi}")


# ------------------------------------------------------------------------------------------------ checks


def _vec2(x) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(isinstance(v, (int, float)) for v in x)


def check_workflow(wf: dict, schemas: dict, name: str = "workflow") -> None:
    """Raise WorkflowError at the first problem: format, node types, links and their types, widget values, models."""
    for key, kind in (("last_node_id", int), ("last_link_id", int), ("nodes", list), ("links", list),
                      ("version", (int, float))):
        if not isinstance(wf.get(key), kind):
            raise WorkflowError(f"{name}: top-level {key!r} is {wf.get(key)!r}, expected {kind}")
    for key in ("groups", "models"):
        if key in wf and not isinstance(wf[key], list):
            raise WorkflowError(f"{name}: {key!r} must be a list")
    nodes = {}
    for n in wf["nodes"]:
        where = f"{name}: node {n.get('id')!r} ({n.get('type')})"
        if not isinstance(n.get("id"), int) or n["id"] in nodes:
            raise WorkflowError(f"{where}: id must be a unique integer")
        if not isinstance(n.get("type"), str) or not _vec2(n.get("pos")) or not _vec2(n.get("size")):
            raise WorkflowError(f"{where}: needs type (string), pos and size ([x, y])")
        for key, kind in (("flags", dict), ("order", int), ("mode", int), ("properties", dict)):
            if not isinstance(n.get(key), kind):
                raise WorkflowError(f"{where}: {key!r} is {n.get(key)!r}, expected {kind.__name__}")
        if n["type"] not in schemas and n["type"] not in FRONTEND_ONLY:
            raise WorkflowError(f"{where}: unknown node type; only ComfyUI core nodes used here and this pack's")
        nodes[n["id"]] = n
    if max(nodes, default=0) > wf["last_node_id"]:
        raise WorkflowError(f"{name}: last_node_id {wf['last_node_id']} is below the largest node id {max(nodes)}")
    links = {}
    for link in wf["links"]:
        if not (isinstance(link, list) and len(link) == 6):
            raise WorkflowError(f"{name}: link {link!r} is not [id, from, from_slot, to, to_slot, type]")
        lid, src, sslot, dst, dslot, ltype = link
        if lid in links:
            raise WorkflowError(f"{name}: link id {lid} used twice")
        links[lid] = link
        if src not in nodes or dst not in nodes:
            raise WorkflowError(f"{name}: link {lid} joins missing node {src if src not in nodes else dst}")
        s, d = nodes[src], nodes[dst]
        outs, ins = s.get("outputs") or [], d.get("inputs") or []
        if not (0 <= sslot < len(outs)) or not (0 <= dslot < len(ins)):
            raise WorkflowError(f"{name}: link {lid} uses slot {sslot} of node {src} / {dslot} of node {dst}, "
                                "which do not exist")
        if lid not in (outs[sslot].get("links") or []) or ins[dslot].get("link") != lid:
            raise WorkflowError(f"{name}: link {lid} is not recorded on both ends (outputs[].links / inputs[].link)")
        out_type = schemas[s["type"]]["output"][sslot]
        in_name = ins[dslot]["name"]
        in_spec = schemas[d["type"]]["inputs"].get(in_name)
        if in_spec is None:
            raise WorkflowError(f"{name}: link {lid} ends at input {in_name!r} of {d['type']}, which has no such input")
        if not (ltype == out_type == in_spec["type"] == outs[sslot]["type"] == ins[dslot]["type"]):
            raise WorkflowError(f"{name}: link {lid} {s['type']}[{sslot}] -> {d['type']}.{in_name}: types "
                                f"{out_type} -> {in_spec['type']} (link says {ltype})")
    if max(links, default=0) > wf["last_link_id"]:
        raise WorkflowError(f"{name}: last_link_id {wf['last_link_id']} is below the largest link id {max(links)}")
    for n in nodes.values():
        if n["type"] in FRONTEND_ONLY:
            continue
        where = f"{name}: node {n['id']} ({n['type']})"
        schema = schemas[n["type"]]
        for slot, o in enumerate(n.get("outputs") or []):
            if slot >= len(schema["output"]) or o["type"] != schema["output"][slot]:
                raise WorkflowError(f"{where}: output {slot} is {o.get('type')}, schema says {schema['output']}")
            for lid in o.get("links") or []:
                if lid not in links:
                    raise WorkflowError(f"{where}: output {slot} lists link {lid}, which is not in links")
        linked = {i["name"] for i in n.get("inputs") or [] if i.get("link") is not None}
        for i in n.get("inputs") or []:
            if i.get("link") is not None and i["link"] not in links:
                raise WorkflowError(f"{where}: input {i['name']!r} names link {i['link']}, which is not in links")
        for in_name, spec in schema["inputs"].items():
            if spec["section"] == "required" and spec["type"] not in WIDGET_TYPES and in_name not in linked:
                raise WorkflowError(f"{where}: required input {in_name!r} ({spec['type']}) is not connected")
        widget_values(schema, n.get("widgets_values") or [], where)
    check_models(wf, schemas, name)


def check_models(wf: dict, schemas: dict, name: str) -> None:
    """Every checkpoint / SAE file a node expects is listed in the top-level models with a source and folder."""
    models = wf.get("models") or []
    for m in models:
        if not (isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("directory"), str)
                and isinstance(m.get("url"), str) and m["url"].startswith("https://")):
            raise WorkflowError(f"{name}: models entry {m!r} needs name, https url and directory")
        if m["directory"] not in MODEL_DIRS:
            raise WorkflowError(f"{name}: models entry {m['name']!r} has directory {m['directory']!r}, "
                                f"expected one of {sorted(MODEL_DIRS)}")
    listed = {(m["directory"], m["name"]) for m in models}
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        values = widget_values(schemas[n["type"]], n.get("widgets_values") or [], f"{name}: node {n['id']}")
        for (t, inp), (folder, exts) in FILE_COMBOS.items():
            if n["type"] != t:
                continue
            v = values[inp]
            if not v.endswith(exts):
                raise WorkflowError(f"{name}: node {n['id']} {inp} is {v!r}, expected a file ending in {exts}")
            if folder != "sae_concepts" and (folder, v) not in listed:
                raise WorkflowError(f"{name}: node {n['id']} expects {folder}/{v} but the top-level models "
                                    "list does not name it with its source")


def files_expected(wf: dict, schemas: dict) -> dict[str, set[str]]:
    """{folder: file names} the workflow's loaders select (checkpoints, sae, sae_concepts)."""
    out: dict[str, set[str]] = {}
    for n in wf["nodes"]:
        for (t, inp), (folder, _) in FILE_COMBOS.items():
            if n["type"] == t:
                v = widget_values(schemas[t], n["widgets_values"], t)[inp]
                out.setdefault(folder, set()).add(v)
    return out


def to_api(wf: dict, schemas: dict) -> dict:
    """The API prompt the frontend would queue: {id: {"class_type", "inputs"}}; links become [id, slot]."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {link[0]: link for link in wf["links"]}
    prompt = {}
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY or n["mode"] in (2, 4):  # muted / bypassed nodes are not sent
            continue
        schema = schemas[n["type"]]
        inputs: dict[str, Any] = dict(widget_values(schema, n.get("widgets_values") or [], str(n["id"])))
        for i in n.get("inputs") or []:
            if i.get("link") is None:
                continue
            _, src, sslot, _, _, _ = links[i["link"]]
            if nodes[src]["type"] in FRONTEND_ONLY:
                continue
            inputs[i["name"]] = [str(src), sslot]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs, "_meta": {"title": n.get("title", n["type"])}}
    return prompt
