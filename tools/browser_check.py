"""Acceptance check in the real ComfyUI frontend (headless Chromium): every example workflow opens with no missing
node, no widget mismatch and no page error; the frontend's own API conversion equals tools/workflow_format.to_api;
the Mask Preview scrubber and the Compare slider react to keyboard and mouse. Screenshots go to --shots (keep
them out of the repository); --thumbnails writes example_workflows/<name>.jpg from the graph screenshots.

    COMFYUI_PATH=<ComfyUI checkout> <ComfyUI venv>/bin/python tools/browser_check.py --shots <folder outside the repo> [--thumbnails]

Needs ComfyUI (with comfyui-frontend-package), Chromium (CHROMIUM, default /usr/bin/chromium), Node.js and
playwright-core (PLAYWRIGHT_DIR: a folder with node_modules/playwright-core; no browser download). When one is
missing it prints why and exits 0 (``check`` raises Skip), so CI without a browser passes cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from build_workflows import Graph  # noqa: E402
from comfy_server import PACK_LINK, comfy_server, comfyui_path, get_json  # noqa: E402
from workflow_format import files_expected, load_snapshot, snapshot_schemas, to_api  # noqa: E402

logger = logging.getLogger("browser_check")
WF_DIR = ROOT / "example_workflows"
HELPER_NODES = ROOT / "tests" / "integration" / "helper_nodes.py"  # test-only tiny SD1 model, conds, latent->image
TINY_SAE = "tiny_unet_browser.safetensors"
LIVE_STEPS = 6


class Skip(Exception):
    """A prerequisite (ComfyUI, Chromium, Node.js, playwright-core) is absent."""


def _playwright_dir() -> str | None:
    for d in filter(None, [os.environ.get("PLAYWRIGHT_DIR"), str(ROOT)]):
        if (pathlib.Path(d) / "node_modules" / "playwright-core" / "package.json").is_file():
            return str(pathlib.Path(d) / "node_modules")
    return None


def prerequisites() -> dict:
    comfy = comfyui_path()
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    node = shutil.which("node")
    pw = _playwright_dir()
    missing = [what for what, ok in (("ComfyUI (COMFYUI_PATH)", comfy), ("Chromium (CHROMIUM)", chromium),
                                     ("Node.js", node), ("playwright-core (PLAYWRIGHT_DIR)", pw)) if not ok]
    if comfy and not (pathlib.Path(comfy) / "main.py").is_file():
        missing.append("ComfyUI main.py")
    if missing:
        raise Skip("browser check skipped: missing " + ", ".join(missing))
    return {"comfy": comfy, "chromium": chromium, "node": node, "playwright_dir": pw}


def _placeholders(base: pathlib.Path, workflows: dict) -> None:
    """Empty files under the names the workflows select, so the frontend finds every model (no download dialog)."""
    schemas = load_snapshot()
    for wf in workflows.values():
        for folder, names in files_expected(wf, schemas).items():
            for name in names:
                p = base / "models" / folder / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()


def _tiny_sae(path: pathlib.Path) -> None:
    """A random TopK SAE for the tiny UNet's output_blocks.4.1 (128 channels); no family recorded (not real SD1)."""
    import torch

    from sae_core import SAEConfig, SparseAutoencoder, save_native

    g = torch.Generator().manual_seed(3)
    W_dec = torch.randn(64, 128, generator=g)
    cfg = SAEConfig(d_in=128, n_latents=64, k=8, hook_point="up_blocks.1.attentions.1")
    sae = SparseAutoencoder(cfg, W_enc=torch.randn(64, 128, generator=g) / 128**0.5, b_enc=torch.zeros(64),
                            W_dec=W_dec / W_dec.norm(dim=-1, keepdim=True), b_dec=torch.zeros(128))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_native(sae, path)


def live_workflow(object_info: dict) -> dict:
    """A UI graph that really runs on CPU: tiny SD1 -> Patch Replacer / SAE Steer -> KSamplers -> Mask Preview,
    Compare. Built from the live schemas (the helper nodes are not in the snapshot)."""
    types = ["SAETestTinySD1", "SAETestConds", "SAETestLatentToImage", "EmptyLatentImage", "KSampler", "SAELoad",
             "SAEConceptDetector", "SAEPatchReplacer", "SAESteer", "SAEMaskPreview", "SAECompare", "EmptyImage", "ImageBlend"]
    g = Graph(snapshot_schemas(object_info, types))
    m = g.node("SAETestTinySD1", (0, 0), size=[240, 60])
    c = g.node("SAETestConds", (0, 120), size=[240, 80])
    lat = g.node("EmptyLatentImage", (0, 260), {"width": 512, "height": 384, "batch_size": 1})
    sae = g.node("SAELoad", (0, 420), {"sae_name": TINY_SAE})
    det = g.node("SAEConceptDetector", (300, 0), {"latent_ids": "0, 4", "typed_threshold": 0.3,
                                                  "padding": 0})
    g.link(sae, "SAE", det, "sae")
    per = g.node("SAEPatchReplacer", (300, 420), {"mode": "random", "seed": 0})
    steer = g.node("SAESteer", (300, 600), {"method": "saeuron_scale", "strength": -10.0})
    for e in (per, steer):
        g.link(m, "MODEL", e, "model")
        g.link(det, "DETECTOR", e, "detector")
    images = []
    for i, src in enumerate(((m, "MODEL"), (per, "MODEL"), (steer, "MODEL"))):
        k = g.node("KSampler", (660, 330 * i), {"seed": 5, "steps": LIVE_STEPS, "cfg": 4.0, "sampler_name": "euler",
                                                "scheduler": "normal", "denoise": 1.0})
        g.link(*src, k, "model")
        g.link(c, "CONDITIONING", k, "positive")
        g.link(c, "CONDITIONING", k, "negative")
        g.link(lat, "LATENT", k, "latent_image")
        img = g.node("SAETestLatentToImage", (1000, 330 * i + 40), size=[220, 50])
        g.link(k, "LATENT", img, "samples")
        images.append(img)
    # the tiny random UNet "decodes" to coloured noise: the PER image is faded into flat grey (90 %) so that each
    # step's recorded mask is plain to see; the masks are the real ones of the PER run
    grey = g.node("EmptyImage", (1000, 1000), {"width": 512, "height": 384, "batch_size": 1, "color": 0x707070})
    faded = g.node("ImageBlend", (1000, 1160), {"blend_factor": 0.9, "blend_mode": "normal"})
    g.link(images[1], "IMAGE", faded, "image1")
    g.link(grey, "IMAGE", faded, "image2")
    mp = g.node("SAEMaskPreview", (1260, 0), {"opacity": 0.8}, size=[360, 640])
    g.link(per, "DETECTIONS", mp, "detections")
    g.link(faded, "IMAGE", mp, "images")
    cmp_ = g.node("SAECompare", (1660, 0), {"label_a": "original", "label_b": "Patch Replacer + mask",
                                            "label_c": "SAE Steer"}, size=[420, 640])
    g.link(images[0], "IMAGE", cmp_, "image_a")
    g.link(mp, "IMAGE", cmp_, "image_b")  # the overlay: the wipe shows where the patches were replaced
    g.link(images[2], "IMAGE", cmp_, "image_c")
    return g.workflow("browser_check_live", [])


def check(shots: pathlib.Path, python: str = sys.executable, timeout: float = 600, frontend_root: str | None = None,
          vue_nodes: bool = False) -> dict:
    """Run the whole check; return the report with a list of ``problems`` (empty = passed).

    ``frontend_root``: a comfyui-frontend-package build's static folder to serve instead of the installed one;
    ``vue_nodes``: run with Nodes 2.0 (the Vue node renderer, setting Comfy.VueNodes.Enabled) instead of the
    classic canvas."""
    pre = prerequisites()
    shots = pathlib.Path(shots)
    shots.mkdir(parents=True, exist_ok=True)
    names = sorted(p.stem for p in WF_DIR.glob("*.json"))
    workflows = {n: json.loads((WF_DIR / f"{n}.json").read_text()) for n in names}
    with tempfile.TemporaryDirectory(prefix="sae_browser_") as tmp:
        base = pathlib.Path(tmp) / "base"
        _placeholders(base, workflows)
        _tiny_sae(base / "models" / "sae" / TINY_SAE)
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        os.symlink(HELPER_NODES, base / "custom_nodes" / "sae_test_helpers.py")
        extra = ["--front-end-root", frontend_root] if frontend_root else []
        with comfy_server(base, python, pre["comfy"], extra_args=extra) as url:
            live = live_workflow(get_json(url + "/object_info", timeout=60))
            live_file = pathlib.Path(tmp) / "live.json"
            live_file.write_text(json.dumps(live))
            job = {"url": url, "chromium": pre["chromium"], "playwright_dir": pre["playwright_dir"],
                   "profile": str(pathlib.Path(tmp) / "profile"), "shots": str(shots),
                   "workflows": {n: str(WF_DIR / f"{n}.json") for n in names}, "live_workflow": str(live_file),
                   "vue_nodes": bool(vue_nodes), "pack_module": PACK_LINK}
            job_file = pathlib.Path(tmp) / "job.json"
            job_file.write_text(json.dumps(job))
            proc = subprocess.run([pre["node"], str(HERE / "browser_check.mjs"), str(job_file)], capture_output=True,
                                  text=True, timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"browser_check.mjs failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n"
                                   f"server log:\n{(base / 'server.log').read_text()[-3000:]}")
    report = json.loads((shots / "report.json").read_text())
    # a Nodes 2.0 renderer that puts no node on the page at all (frontend 1.27's experimental one, switched on at
    # run time): nothing of any node is there to check
    report["renderer_shows_nothing"] = bool(report.get("vue_nodes_active")) and not any(
        r.get("panels") for r in report["workflows"].values())
    report["problems"] = problems(report, workflows)
    (shots / "report.json").write_text(json.dumps(report, indent=1))
    return report


def problems(report: dict, workflows: dict) -> list[str]:
    out = []
    schemas = load_snapshot()
    if not report.get("extension_loaded"):
        out.append("extension sae_concept_eraser.previews was not registered")
    if report.get("vue_nodes_requested") and not report.get("vue_nodes_active"):
        out.append(f"Nodes 2.0 was requested but frontend {report.get('frontend_version')} did not switch to it "
                   "(Comfy.VueNodes.Enabled)")
    if report.get("renderer_shows_nothing"):
        out.append(f"frontend {report.get('frontend_version')}: Nodes 2.0 put no node on the page (not one panel in "
                   "any workflow); its renderer cannot be checked")
    listed = report.get("templates_listed") or []
    for name in workflows:
        if name not in listed:
            out.append(f"{name}: not listed by /workflow_templates under the pack")
        thumb = report.get("thumbnails", {}).get(name)
        if not thumb or thumb.get("status") != 200 or not thumb.get("jpeg"):
            out.append(f"{name}: thumbnail at the frontend's URL not served as a JPEG ({thumb})")
    for name, wf in workflows.items():
        r = report["workflows"].get(name)
        if r is None:
            out.append(f"{name}: not loaded")
            continue
        out += [f"{name}: missing node type {t}" for t in r["missing"]]
        out += [f"{name}: {e}" for e in r["widgetErrors"]]
        out += [f"{name}: dialog shown: {d}" for d in r["dialogs"]]
        if r["nodes"] != len(wf["nodes"]) or r["links"] != len(wf["links"]):
            out.append(f"{name}: frontend has {r['nodes']} nodes / {r['links']} links, file {len(wf['nodes'])} / "
                       f"{len(wf['links'])}")
        ours = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in to_api(wf, schemas).items()}
        theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in r["api"].items()}
        if ours != theirs:
            diff = [k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)]
            out.append(f"{name}: frontend API prompt differs from to_api at nodes {sorted(diff)}: "
                       f"{[(ours.get(k), theirs.get(k)) for k in sorted(diff)[:2]]}")
        strangers = set(r.get("touched", [])) - {"SAEMaskPreview", "SAECompare"}
        if strangers:
            out.append(f"{name}: the extension touched other node types {sorted(strangers)}")
        want_panels = {"SAEMaskPreview": "sae_step_scrubber", "SAECompare": "sae_compare_slider"}
        for t, panel in want_panels.items():
            if any(n["type"] == t for n in wf["nodes"]) and panel not in r["panels"]:
                out.append(f"{name}: {t} has no {panel} panel")
    # errors raised in our extension's code (its file is in the stack); the frontend's own start-up errors on a
    # fresh profile (setting migrations) are kept in the report but are not this pack's
    out += [f"page error: {e}" for e in report.get("page_errors", []) if "sae-concept-eraser" in e or "sae_" in e]
    if report.get("live_skipped"):
        out.append(f"live run skipped: {report['live_skipped']}")
        return out
    if report.get("live_failed"):
        out.append(f"the run's results never showed in the panels: {report['live_failed']}")
        return out
    mp = report["behaviour"].get("SAEMaskPreview", {})
    steps = [s["step"] for s in mp.get("states", [])]
    hashes = [s["hash"] for s in mp.get("states", [])]
    if steps != [str(i) for i in range(LIVE_STEPS)] or len(set(hashes)) < 2:
        out.append(f"scrubber did not move through the steps: {steps}, {len(set(hashes))} distinct pictures")
    cmp_ = report["behaviour"].get("SAECompare", {})
    fr = [float(s["fraction"]) for s in cmp_.get("states", [])]
    if len(fr) != 3 or not fr[0] < fr[1] < fr[2] or len({s["hash"] for s in cmp_["states"]}) != 3:
        out.append(f"slider did not follow the mouse: fractions {fr}")
    for t in ("SAEMaskPreview", "SAECompare"):
        rm = report["behaviour"].get(t, {}).get("removed", {})
        if not (rm.get("aborted") and rm.get("viewCleared")):
            out.append(f"{t}: listeners not removed with the node ({rm})")
    return out


def thumbnails(shots: pathlib.Path, width: int = 640) -> None:
    from PIL import Image

    for png in sorted(WF_DIR.glob("*.json")):
        src = pathlib.Path(shots) / f"{png.stem}.png"
        with Image.open(src) as im:
            im = im.convert("RGB")
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
            im.save(WF_DIR / f"{png.stem}.jpg", quality=85, optimize=True)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shots", required=True, help="folder for screenshots and report.json (outside the repository)")
    ap.add_argument("--thumbnails", action="store_true", help="write example_workflows/*.jpg from the screenshots")
    ap.add_argument("--frontend-root", default=None,
                    help="static folder of another comfyui-frontend-package build (ComfyUI's --front-end-root)")
    ap.add_argument("--vue-nodes", action="store_true", help="check under Nodes 2.0 (the Vue node renderer)")
    args = ap.parse_args()
    try:
        report = check(pathlib.Path(args.shots), frontend_root=args.frontend_root, vue_nodes=args.vue_nodes)
    except Skip as e:
        logger.info("%s", e)
        return 0
    if args.thumbnails:
        thumbnails(pathlib.Path(args.shots))
    for p in report["problems"]:
        logger.error("%s", p)
    logger.info("%d workflows checked, %d problems; screenshots in %s", len(report["workflows"]),
                len(report["problems"]), args.shots)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
