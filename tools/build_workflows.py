"""Write the example workflows in example_workflows/ (ComfyUI UI format, version 0.4).

Widget order, input and output slots come from the schema snapshot (tests/data/node_schemas.json), so a
schema change shows up as a failing test rather than as a silently wrong file. Run:

    python tools/build_workflows.py            # then tools/browser_check.py renders the .jpg thumbnails
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from workflow_format import WIDGET_TYPES, check_workflow, load_snapshot, widgets_of  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[1] / "example_workflows"

TURBO = {"name": "sd_xl_turbo_1.0_fp16.safetensors",
         "url": "https://huggingface.co/stabilityai/sdxl-turbo/resolve/main/sd_xl_turbo_1.0_fp16.safetensors",
         "directory": "checkpoints"}
SD15 = {"name": "v1-5-pruned-emaonly-fp16.safetensors",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
               "v1-5-pruned-emaonly-fp16.safetensors",
        "directory": "checkpoints"}
FLUX_SCHNELL = {"name": "flux1-schnell-fp8.safetensors",
                "url": "https://huggingface.co/Comfy-Org/flux1-schnell/resolve/main/flux1-schnell-fp8.safetensors",
                "directory": "checkpoints"}
# SAE sources are checkpoint directories, not single files: the name is the native file `python -m sae_core
# convert` writes from them (the Note in each workflow says how).
UNBOX = {"name": "sdxl_unbox_down.2.1.safetensors", "url": "https://github.com/surkovv/sdxl-unbox",
         "directory": "sae"}
SAEURON_OBJ = {"name": "saeuron_objects_up.1.1.safetensors", "url": "https://huggingface.co/bcywinski/SAeUron",
               "directory": "sae"}
SAEURON_STY = {"name": "saeuron_styles_up.1.2.safetensors", "url": "https://huggingface.co/bcywinski/SAeUron",
               "directory": "sae"}

UNBOX_NOTE = (
    "## Files\n"
    "* **checkpoints/** `sd_xl_turbo_1.0_fp16.safetensors` (stabilityai/sdxl-turbo).\n"
    "* **sae/** `sdxl_unbox_down.2.1.safetensors`: the sdxl-unbox SAE of `down_blocks.2.attentions.1`. "
    "Download `checkpoints/unet.down_blocks.2.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001/final` "
    "from github.com/surkovv/sdxl-unbox, then convert it to one native file:\n\n"
    "`python custom_nodes/sae-concept-eraser convert <that folder> models/sae/sdxl_unbox_down.2.1.safetensors`\n\n"
    "(run in the ComfyUI folder with the Python that runs ComfyUI; or skip converting: Load SAE also reads the "
    "folder itself when you put it in models/sae).\n"
)
KREA_FLUX = {"name": "krea_flux_single_9.safetensors", "url": "https://github.com/RE-N-Y/finebooru",
             "directory": "sae"}
KREA_NOTE = (
    "## Files\n"
    "* **checkpoints/** `flux1-schnell-fp8.safetensors` (Comfy-Org/flux1-schnell: FLUX.1 schnell with its CLIP-L, "
    "T5-XXL fp8 and VAE in one file).\n"
    "* **sae/** `krea_flux_single_9.safetensors`: Krea's TopK SAE of FLUX schnell's "
    "`single_transformer_blocks.9` (3072 -> 12288 latents), checkpoint `cc3m-single_transformer_blocks.9` "
    "(a folder with config.json + model.safetensors) from github.com/RE-N-Y/finebooru. Convert it to one native "
    "file:\n\n"
    "`python custom_nodes/sae-concept-eraser convert <that folder> models/sae/krea_flux_single_9.safetensors`\n\n"
    "(run in the ComfyUI folder with the Python that runs ComfyUI; or skip converting: Load SAE also reads the "
    "folder itself when you put it in models/sae, keeping its name, which carries the hook point).\n"
)
SAEURON_NOTE = (
    "## Files\n"
    "* **checkpoints/** `v1-5-pruned-emaonly-fp16.safetensors` (SD 1.5; SAeUron was trained on the "
    "UnlearnCanvas fine-tune of SD 1.5, which detects its concepts best).\n"
    "* **sae/** `{name}`: the SAeUron SAE of `{hook}` from huggingface.co/bcywinski/SAeUron "
    "(folder `unet.{hook}` with cfg.json + sae.safetensors). Convert it to one native file:\n\n"
    "`python custom_nodes/sae-concept-eraser convert <that folder> models/sae/{name}`\n\n"
    "(run in the ComfyUI folder with the Python that runs ComfyUI; or skip converting: Load SAE also reads the "
    "folder itself when you put it in models/sae).\n"
)


class Graph:
    """A UI-format graph built node by node; slots and widget order from the schema snapshot."""

    def __init__(self, schemas: dict):
        self.schemas = schemas
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def node(self, type_: str, pos, widgets: dict | None = None, size=None, title: str | None = None) -> int:
        schema = self.schemas[type_]
        widgets = dict(widgets or {})
        values = []
        for name, spec, control in widgets_of(schema):
            v = widgets.pop(name) if name in widgets else spec.get("default")
            if v is None and spec["type"] == "COMBO":
                v = spec["options"][0]
            values.append(v)
            if control:
                values.append(widgets.pop("control_after_generate", "fixed"))
        if widgets:
            raise KeyError(f"{type_}: no widgets named {sorted(widgets)}")
        inputs = [{"name": n, "type": schema["inputs"][n]["type"], "link": None}
                  for n in schema["input_order"] if schema["inputs"][n]["type"] not in WIDGET_TYPES]
        outputs = [{"name": nm, "type": t, "links": [], "slot_index": i}
                   for i, (t, nm) in enumerate(zip(schema["output"], schema["output_name"], strict=True))]
        n_w = len(values)
        height = 36 + 22 * max(len(inputs), len(outputs)) + 26 * n_w
        height += sum(90 for n, s, _ in widgets_of(schema) if s.get("multiline"))
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size or [320, height]),
                "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": type_}, "widgets_values": values}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def note(self, pos, text: str, size=(420, 260)) -> int:
        node = {"id": len(self.nodes) + 1, "type": "MarkdownNote", "pos": list(pos), "size": list(size),
                "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
                "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
        self.nodes.append(node)
        return node["id"]

    def link(self, src: int, out: str, dst: int, inp: str) -> None:
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = [o["name"] for o in s["outputs"]].index(out)
        dslot = [i["name"] for i in d["inputs"]].index(inp)
        lid = len(self.links) + 1
        t = s["outputs"][slot]["type"]
        self.links.append([lid, src, slot, dst, dslot, t])
        s["outputs"][slot]["links"].append(lid)
        d["inputs"][dslot]["link"] = lid

    def group(self, title: str, bounding, color: str = "#3f789e") -> None:
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding), "color": color,
                            "font_size": 24, "flags": {}})

    def workflow(self, name: str, models: list[dict]) -> dict:
        for o in (o for n in self.nodes for o in n["outputs"]):
            if not o["links"]:
                o["links"] = None
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "sae-concept-eraser/" + name)), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [40, 60]}}, "version": 0.4, "models": models}


def base(g: Graph, ckpt: str, positive: str, negative: str = "", x: int = 0, y: int = 0,
         width: int = 512, height: int = 512) -> dict:
    ids = {"ckpt": g.node("CheckpointLoaderSimple", (x, y), {"ckpt_name": ckpt}, size=[320, 100])}
    ids["pos"] = g.node("CLIPTextEncode", (x + 360, y), {"text": positive}, size=[340, 130])
    ids["neg"] = g.node("CLIPTextEncode", (x + 360, y + 170), {"text": negative}, size=[340, 130],
                        title="CLIP Text Encode (negative)")
    ids["latent"] = g.node("EmptyLatentImage", (x + 360, y + 340), {"width": width, "height": height})
    for k in ("pos", "neg"):
        g.link(ids["ckpt"], "CLIP", ids[k], "clip")
    return ids


def sampler(g: Graph, ids: dict, model_src: tuple[int, str], pos, widgets: dict, title: str | None = None) -> int:
    k = g.node("KSampler", pos, widgets, title=title)
    g.link(*model_src, k, "model")
    g.link(ids["pos"], "CONDITIONING", k, "positive")
    g.link(ids["neg"], "CONDITIONING", k, "negative")
    g.link(ids["latent"], "LATENT", k, "latent_image")
    return k


def decode(g: Graph, ids: dict, k: int, pos) -> int:
    d = g.node("VAEDecode", (pos[0], pos[1] + 40), size=[220, 60])
    g.link(k, "LATENT", d, "samples")
    g.link(ids["ckpt"], "VAE", d, "vae")
    return d


def compare(g: Graph, images: list[int], labels: list[str], size: list[int]) -> int:
    """A Compare node at the right of the graph fed by ``images`` (two or three VAEDecode nodes)."""
    slots = ("a", "b", "c")
    labels = [*labels, ""] if len(labels) == 2 else labels
    c = g.node("SAECompare", (1760, 0), {f"label_{k}": v for k, v in zip(slots, labels, strict=True)}, size=size)
    for d, k in zip(images, slots[:len(images)], strict=True):
        g.link(d, "IMAGE", c, f"image_{k}")
    return c


TURBO_SAMPLING = {"seed": 42, "steps": 4, "cfg": 1.0, "sampler_name": "euler_ancestral", "scheduler": "sgm_uniform",
                  "denoise": 1.0}
TURBO_LEARN = {"width": 512, "height": 512, "steps": 4, "cfg": 1.0, "sampler_name": "euler_ancestral",
               "scheduler": "sgm_uniform", "seed": 188, "selection": "top_n", "top_n": 3}
SD15_SAMPLING = {"seed": 42, "steps": 25, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
SD15_LEARN = {"width": 512, "height": 512, "steps": 25, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
              "seed": 188}


def learn(g: Graph, ids: dict, sae: int, pos, name: str, prompts: list[str], extra: dict) -> int:
    n = g.node("SAELearnConcept", pos, {"concept_name": name, "concept_prompts": "\n".join(prompts), **extra})
    g.link(ids["ckpt"], "MODEL", n, "model")
    g.link(ids["ckpt"], "CLIP", n, "clip")
    g.link(sae, "SAE", n, "sae")
    return n


def detector(g: Graph, sae: int, concepts: list[int], pos, widgets: dict | None = None) -> int:
    d = g.node("SAEConceptDetector", pos, widgets or {})
    g.link(sae, "SAE", d, "sae")
    for c, slot in zip(concepts, ("concept", "concept_2", "concept_3"), strict=False):
        g.link(c, "CONCEPT", d, slot)
    return d


def edit(g: Graph, type_: str, ids: dict, det: int, pos, widgets: dict) -> int:
    e = g.node(type_, pos, widgets)
    g.link(ids["ckpt"], "MODEL", e, "model")
    g.link(det, "DETECTOR", e, "detector")
    return e


def mask_preview(g: Graph, edit_id: int, dec: int, pos) -> int:
    m = g.node("SAEMaskPreview", pos, {}, size=[340, 560])
    g.link(edit_id, "DETECTIONS", m, "detections")
    g.link(dec, "IMAGE", m, "images")
    return m


DOG = ["a photo of a dog", "a dog running on the grass", "a close-up photo of a dog's face",
       "a dog sleeping on a sofa", "a dog on a beach"]


def wf_object_erasure(schemas) -> dict:
    g = Graph(schemas)
    ids = base(g, TURBO["name"], "a photo of a dog sitting on a park bench, golden hour light")
    sae = g.node("SAELoad", (0, 200), {"sae_name": UNBOX["name"]})
    con = learn(g, ids, sae, (0, 460), "dog", DOG, TURBO_LEARN)
    det = detector(g, sae, [con], (760, 0), {"padding": 1})
    per = edit(g, "SAEPatchReplacer", ids, det, (760, 380), {"mode": "background", "seed": 0, "look_ahead": True})
    k = sampler(g, ids, (per, "MODEL"), (1120, 0), TURBO_SAMPLING)
    dec = decode(g, ids, k, (1120, 330))
    g.link(dec, "IMAGE", g.node("SaveImage", (1480, 0), {"filename_prefix": "sae_erased"}, size=[340, 400]), "images")
    mask_preview(g, per, dec, (1860, 0))
    g.note((760, 600), "# SDXL-Turbo object erasure (PER)\nLearn Concept records which SAE latents fire for "
           "'dog' (4-step Turbo runs of the prompts against a built-in contrast set), Concept Detector turns them "
           "into a patch mask, Patch Replacer swaps the detected patch embeddings for undetected ones of the same "
           "feature map. Mask Preview shows where: drag its step scrubber to see each step's mask.\n\n" + UNBOX_NOTE,
           size=[340, 520])
    return g.workflow("sdxl_turbo_object_erasure", [TURBO, UNBOX])


FLUX_SAMPLING = {"seed": 42, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
FLUX_LEARN = {"width": 512, "height": 512, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
              "seed": 188, "selection": "top_n", "top_n": 3}


def wf_flux_object_erasure(schemas) -> dict:
    g = Graph(schemas)
    ids = base(g, FLUX_SCHNELL["name"], "a photo of a dog sitting on a park bench, golden hour light")
    sae = g.node("SAELoad", (0, 200), {"sae_name": KREA_FLUX["name"]})
    con = learn(g, ids, sae, (0, 460), "dog", DOG, FLUX_LEARN)
    det = detector(g, sae, [con], (760, 0), {"padding": 1})
    per = edit(g, "SAEPatchReplacer", ids, det, (760, 380), {"mode": "background", "seed": 0, "look_ahead": True})
    k0 = sampler(g, ids, (ids["ckpt"], "MODEL"), (1120, 0), FLUX_SAMPLING, title="KSampler (original)")
    k1 = sampler(g, ids, (per, "MODEL"), (1120, 360), FLUX_SAMPLING, title="KSampler (Patch Replacer)")
    d0, d1 = decode(g, ids, k0, (1480, 0)), decode(g, ids, k1, (1480, 360))
    compare(g, [d0, d1], ["original", "dog erased"], [520, 460])
    mask_preview(g, per, d1, (1760, 520))
    g.note((760, 600), "# FLUX.1 schnell object erasure (PER)\nThe same nodes as on SD: the SAE sits on a FLUX "
           "block's image tokens (a 2x2-patch grid, 32x32 at 512 px; the text tokens are never touched). Learn "
           "Concept records the SAE latents that fire for 'dog' over 4-step schnell runs (cfg 1: schnell is "
           "guidance-distilled, there is no negative branch), Concept Detector turns them into a patch mask, Patch "
           "Replacer copies undetected patch embeddings of the same feature map into the detected ones. Mask "
           "Preview shows where.\n\n" + KREA_NOTE, size=[340, 620])
    return g.workflow("flux_schnell_object_erasure", [FLUX_SCHNELL, KREA_FLUX])


def wf_compare(schemas) -> dict:
    g = Graph(schemas)
    ids = base(g, TURBO["name"], "a photo of a dog sitting on a park bench, golden hour light")
    sae = g.node("SAELoad", (0, 200), {"sae_name": UNBOX["name"]})
    con = learn(g, ids, sae, (0, 460), "dog", DOG, TURBO_LEARN)
    det = detector(g, sae, [con], (760, 0), {"padding": 1})
    per = edit(g, "SAEPatchReplacer", ids, det, (760, 380), {"mode": "background", "seed": 0, "look_ahead": True})
    steer = edit(g, "SAESteer", ids, det, (760, 600), {"method": "unbox_add", "strength": -4.0,
                                                       "error": "preserve", "detected_only": True})
    k0 = sampler(g, ids, (ids["ckpt"], "MODEL"), (1120, 0), TURBO_SAMPLING, title="KSampler (original)")
    k1 = sampler(g, ids, (per, "MODEL"), (1120, 360), TURBO_SAMPLING, title="KSampler (Patch Replacer)")
    k2 = sampler(g, ids, (steer, "MODEL"), (1120, 720), TURBO_SAMPLING, title="KSampler (SAE Steer)")
    d0, d1, d2 = (decode(g, ids, k, (1480, 360 * i)) for i, k in enumerate((k0, k1, k2)))
    compare(g, [d0, d1, d2], ["original", "Patch Replacer", "SAE Steer"], [520, 620])
    g.note((360, 560), "# Original vs SAE Steer vs Patch Replacer\nThe three KSamplers share one seed, prompt "
           "and latent; only the model differs. Compare shows the three side by side; drag its slider to wipe "
           "between the original and the branch picked in its menu. Steering edits the SAE latents (pushes activations off their "
           "distribution: artifacts appear); PER only reads them to detect and copies in-distribution patches.\n\n"
           + UNBOX_NOTE, size=[380, 560])
    return g.workflow("compare_steer_vs_replace", [TURBO, UNBOX])


def wf_style(schemas) -> dict:
    g = Graph(schemas)
    ids = base(g, SD15["name"], "a painting of a village by a river in the style of Van Gogh",
               "blurry, low quality")
    sae = g.node("SAELoad", (0, 200), {"sae_name": SAEURON_STY["name"]})
    con = learn(g, ids, sae, (0, 460), "van_gogh",
                ["a painting of a house in the style of Van Gogh", "a portrait in the style of Van Gogh",
                 "a landscape with cypress trees in the style of Van Gogh", "a still life in the style of Van Gogh"],
                {**SD15_LEARN, "selection": "percentile", "percentile": 99.999,
                 "contrast_prompts": "a painting of a house\na portrait of a woman\na landscape with trees\n"
                                     "a still life with flowers\na watercolor of a harbour\na pencil sketch of a city"})
    det = detector(g, sae, [con], (760, 0), {"padding": 0})
    per = edit(g, "SAEPatchReplacer", ids, det, (760, 380), {"mode": "background", "seed": 0, "look_ahead": True})
    k0 = sampler(g, ids, (ids["ckpt"], "MODEL"), (1120, 0), SD15_SAMPLING, title="KSampler (original)")
    k1 = sampler(g, ids, (per, "MODEL"), (1120, 360), SD15_SAMPLING, title="KSampler (Patch Replacer)")
    d0, d1 = decode(g, ids, k0, (1480, 0)), decode(g, ids, k1, (1480, 360))
    compare(g, [d0, d1], ["original", "style erased"], [520, 460])
    mask_preview(g, per, d1, (1760, 520))
    g.note((760, 600), "# SD 1.5 style erasure with a SAeUron SAE\nSAeUron's style SAE sits on "
           "`up_blocks.1.attentions.2` (16x16 patches at 512 px). Learn Concept scores the latents per timestep "
           "(SAeUron: percentile 99.999 keeps about one latent of 20480), Patch Replacer replaces the patches where "
           "they fire.\n\n" + SAEURON_NOTE.format(name=SAEURON_STY["name"], hook="up_blocks.1.attentions.2"),
           size=[340, 560])
    return g.workflow("sd15_style_erasure_saeuron", [SD15, SAEURON_STY])


def wf_learn(schemas) -> dict:
    g = Graph(schemas)
    ids = {"ckpt": g.node("CheckpointLoaderSimple", (0, 0), {"ckpt_name": SD15["name"]}, size=[320, 100])}
    sae = g.node("SAELoad", (0, 160), {"sae_name": SAEURON_OBJ["name"]})
    con = learn(g, ids, sae, (380, 0), "cat",
                ["a photo of a cat", "a cat sitting on a windowsill", "a close-up photo of a cat's face",
                 "a cat sleeping on a bed", "a black cat in a garden"],
                {**SD15_LEARN, "selection": "percentile", "percentile": 99.99})
    save = g.node("SAESaveConcept", (760, 0), {"filename": "cat_saeuron_objects", "overwrite": False},
                  size=[340, 160])
    g.link(con, "CONCEPT", save, "concept")
    g.note((760, 220), "# Learn a concept and save it\nLearn Concept samples every concept prompt and every "
           "contrast prompt (empty = a built-in set of generic scenes, minus any that names the concept: here the "
           "cat scene), records the SAE codes of the positive branch at each step and keeps the latents that score "
           "highest for the concept (SAeUron's score).\n\n**Cost:** one full sampling per prompt: 5 cat prompts + "
           "9 contrast scenes = 14 samplings of 25 CFG steps at 512 px, a minute or two on a GPU, about 85 minutes "
           "on a CPU. Learn once, save, then reuse the file with Load Concept.\n\n"
           "Save Concept writes `models/sae_concepts/cat_saeuron_objects.safetensors`: a small file bound to this "
           "SAE's fingerprint. Share it; others load it with Load Concept (connect their SAE to check it "
           "matches).\n\n" + SAEURON_NOTE.format(name=SAEURON_OBJ["name"], hook="up_blocks.1.attentions.1"),
           size=[420, 480])
    return g.workflow("learn_and_save_concept", [SD15, SAEURON_OBJ])


def wf_two(schemas) -> dict:
    g = Graph(schemas)
    ids = base(g, TURBO["name"], "a dog and a bicycle in front of a red brick house, photo")
    sae = g.node("SAELoad", (0, 200), {"sae_name": UNBOX["name"]})
    c1 = learn(g, ids, sae, (0, 460), "dog", DOG, TURBO_LEARN)
    c2 = learn(g, ids, sae, (0, 1240), "bicycle",
               ["a photo of a bicycle", "a bicycle leaning against a wall", "a red bicycle on a street",
                "a close-up photo of a bicycle wheel", "a bicycle in a park"], TURBO_LEARN)
    det = detector(g, sae, [c1, c2], (760, 0), {"padding": 1})
    per = edit(g, "SAEPatchReplacer", ids, det, (760, 380), {"mode": "background", "seed": 0, "look_ahead": True})
    k0 = sampler(g, ids, (ids["ckpt"], "MODEL"), (1120, 0), TURBO_SAMPLING, title="KSampler (original)")
    k1 = sampler(g, ids, (per, "MODEL"), (1120, 360), TURBO_SAMPLING, title="KSampler (both erased)")
    d0, d1 = decode(g, ids, k0, (1480, 0)), decode(g, ids, k1, (1480, 360))
    compare(g, [d0, d1], ["original", "dog + bicycle erased"], [520, 460])
    mask_preview(g, per, d1, (1760, 520))
    g.note((760, 600), "# Two concepts erased at once\nConcept Detector unites the detections of every "
           "connected concept (up to three, plus typed latent ids); one Patch Replacer then erases them all in "
           "one pass.\n\n" + UNBOX_NOTE, size=[340, 520])
    return g.workflow("two_concepts_at_once", [TURBO, UNBOX])


def wf_train(schemas) -> dict:
    g = Graph(schemas)
    ck = g.node("CheckpointLoaderSimple", (0, 0), {"ckpt_name": SD15["name"]}, size=[320, 100])
    prompts = "\n".join(["a photo of a cat", "a dog running on a beach", "a red car parked on a street",
                          "a bowl of fruit on a wooden table", "a house with a garden", "a bird on a branch",
                          "a person riding a bicycle", "a cup of coffee next to a laptop"])
    col = g.node("SAECollectActivations", (380, 0),
                 {"block": "up_blocks.1.attentions.1", "prompts": prompts, "dataset_name": "sd15_up_1_1",
                  "width": 512, "height": 512, "steps": 25, "cfg": 7.5, "sampler_name": "euler",
                  "scheduler": "normal", "seed": 0}, size=[380, 640])
    g.link(ck, "MODEL", col, "model")
    g.link(ck, "CLIP", col, "clip")
    tr = g.node("SAETrainSAE", (800, 0), {"dataset": "sd15_up_1_1", "sae_name": "my_sd15_up_1_1", "latents": 20480,
                                          "k": 32, "steps": 5000, "batch_size": 4096, "max_minutes": 10.0},
                size=[360, 420])
    g.link(col, "DATASET", tr, "dataset_in")
    g.note((800, 460), "# Train your own SAE\nCollect Activations samples every prompt with the given settings and "
           "records the output of one block (cond branch, every step) into `output/sae_datasets/sd15_up_1_1` "
           "(safetensors shards + manifest.json). Use hundreds of varied prompts for a useful SAE; eight only show "
           "the route. Train SAE trains a TopK SAE on that folder and saves `models/sae/my_sd15_up_1_1.safetensors`, "
           "ready for Load SAE (no `python -m sae_core convert` needed: it is already the native format).\n\n"
           "**The queue**: ComfyUI runs one prompt at a time, so Train SAE stops after `max_minutes`, saves a "
           "checkpoint and the SAE so far, and lets the queue move on. Queue again with `resume` on (and Collect "
           "Activations bypassed, `dataset` set to the folder name) to continue exactly where it stopped. Cancel "
           "keeps the last checkpoint too.\n\n"
           "Large runs are faster from the command line: `python -m sae_core collect` / `train` (README, Train your "
           "own SAE), on several GPUs with `torchrun`.", size=[420, 520])
    return g.workflow("train_your_own_sae", [SD15])


BUILDERS = {"sdxl_turbo_object_erasure": wf_object_erasure, "compare_steer_vs_replace": wf_compare,
            "sd15_style_erasure_saeuron": wf_style, "learn_and_save_concept": wf_learn,
            "two_concepts_at_once": wf_two, "train_your_own_sae": wf_train,
            "flux_schnell_object_erasure": wf_flux_object_erasure}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    schemas = load_snapshot()
    OUT.mkdir(exist_ok=True)
    for name, build in BUILDERS.items():
        wf = build(schemas)
        check_workflow(wf, schemas, name)
        (OUT / f"{name}.json").write_text(json.dumps(wf, indent=2) + "\n")
        logging.info("wrote %s", OUT / f"{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
