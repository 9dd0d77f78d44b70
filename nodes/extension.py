"""ComfyUI V3 nodes of SAE Concept Eraser; thin adapters: the math is in sae_core, the glue in hook.py."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io, ui

from ..sae_core.blocks import FAMILIES, blocks
from ..sae_core.concepts import (
    ConceptDictionary,
    ConceptStatsAccumulator,
    SelectionRule,
    build_concept_dictionary,
    load_concepts,
)
from ..sae_core.config import ACTIVATIONS, INPUT_SPACES
from ..sae_core.detect import TEMPORAL_MODES, ConceptDetector, DetectionSettings
from ..sae_core.errors import SAEFileExistsError, SAEFileNotFoundError, SAEInputError
from ..sae_core.formats import load_sae
from ..sae_core.gate import learn_presence_gate
from ..sae_core.intervention import (
    REGION_MODES,
    BlockIntervention,
    ConceptCollector,
    Recorder,
    ReplaceSettings,
)
from ..sae_core.lookahead import LookAheadSettings
from ..sae_core.mixins import SharedOnCopy
from ..sae_core.replace import MODES
from ..sae_core.steer import CFG_SIGNS, ERROR_MODES, METHODS
from . import folders
from .grid import compare_grid
from .hook import (
    RunState,
    check_window,
    family_of_config,
    install_patch,
    resolve_hook,
    sigma_window,
    steer_settings,
)
from .learn import (
    DEFAULT_CONTRAST,
    concept_words,
    default_contrast,
    parse_latent_ids,
    parse_prompts,
    prompts_naming,
)
from .masks import AGGREGATES, SHOW, normalise, overlay, parse_color, pick_step, recorded_maps, upscale
from .templates import register_thumbnail_route
from .train_nodes import NODES as TRAIN_NODES
from .ui_payload import compare_payload, mask_step_payload

logger = logging.getLogger(__name__)

CATEGORY = "SAE"
FROM_FILE = "from file"
CONTRAST_LABEL = "__contrast__"
BRANCH_OPTIONS = ("both", "cond", "uncond")

SAEType = io.Custom("SAE")
ConceptType = io.Custom("SAE_CONCEPT")
DetectorType = io.Custom("SAE_DETECTOR")
DetectionsType = io.Custom("SAE_DETECTIONS")


@dataclass(frozen=True)
class DetectorSpec(SharedOnCopy):
    """What a Concept Detector hands to Patch Replacer / SAE Steer.

    Shared on copy: it holds the SAE, whose weights a deep copy (of model_options, say) must never duplicate.
    """

    sae: object
    detector: ConceptDetector
    branches: str
    start_percent: float
    end_percent: float


def _block_names() -> list[str]:
    names = []
    for fam in FAMILIES:
        for spec in blocks(fam):
            if spec.diffusers not in names:
                names.append(spec.diffusers)
    return names


SAE_MODELS_KEY = "sae_concept_eraser"  # additional_models key of the SAE weights on a patched model
WARNING_EVENT = "sae_concept_eraser.warning"  # websocket event the frontend extension shows as a toast


def _placeholder_patcher(load_device, offload_device, **_):
    """What ComfyUI's multi-GPU deep clone and non-dynamic delegates build from ``cached_patcher_init``: an
    empty module. Those devices use the SAE lazily cast and cached per device instead (the intervention
    casts the weights to each activation's device and dtype)."""
    return comfy.model_patcher.ModelPatcher(torch.nn.Module(), load_device, offload_device)


def sae_patcher(sae):
    """The SAE as a ComfyUI model: loaded to the sampling device with the model and offloaded with it."""
    load = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    patcher = comfy.model_patcher.ModelPatcher(sae, load, offload)
    if hasattr(patcher, "cached_patcher_init"):  # newer ComfyUI deep-clones additional models per device
        patcher.cached_patcher_init = (_placeholder_patcher, (load, offload))
    return patcher


def manage_sae_weights(patched, sae) -> bool:
    """Hand the SAE's weights to ComfyUI's memory management where the patcher supports additional models;
    else (False) they stay where they are and the intervention casts them lazily, cached per device/dtype."""
    if not (hasattr(patched, "set_additional_models") and hasattr(patched, "get_additional_models_with_key")):
        return False
    if not isinstance(sae, torch.nn.Module):
        return False
    have = list(patched.get_additional_models_with_key(SAE_MODELS_KEY))
    if not any(getattr(p, "model", None) is sae for p in have):
        patched.set_additional_models(SAE_MODELS_KEY, have + [sae_patcher(sae)])
    return True


def _prompt_server():
    """ComfyUI's running PromptServer, or None (no server: tests, scripts). Never imports the server module:
    ComfyUI's main has imported it before it loads custom nodes."""
    module = sys.modules.get("server")
    cls = getattr(module, "PromptServer", None)
    return getattr(cls, "instance", None)


def _ui_notifier(node_id):
    """callable(text): show a run's warning in the UI (a toast via our frontend extension, and the node's text);
    the hook has already logged it."""
    def notify(text: str) -> None:
        _tell(node_id, text, level=logging.DEBUG)
        try:
            server = _prompt_server()
            if server is not None:
                server.send_sync(WARNING_EVENT, {"node": node_id, "text": text})
        except Exception as e:  # outside a server
            logger.debug("could not show the warning in the UI: %s", e)

    return notify


def _patch(model, spec: DetectorSpec, edit, kind: str, node_id=None, region=None, region_mode: str = "intersect",
           lookahead: LookAheadSettings | None = None):
    """Validate against the model, then clone and patch the SAE's block. Returns (model, RunState)."""
    key, name = resolve_hook(spec.sae, model)
    recorder = Recorder()
    intervention = BlockIntervention(spec.sae, spec.detector, edit, branches=spec.branches, recorder=recorder,
                                     label=name, region=region, region_mode=region_mode, lookahead=lookahead)
    state = RunState(f"{kind} {name}", recorder, key, intervention=intervention)
    state.notify = _ui_notifier(node_id)
    start, end = spec.start_percent, spec.end_percent
    check_window(start, end)

    def window_of(model_sampling):
        return sigma_window(model_sampling, start, end)

    patched = install_patch(model, key, intervention, state, comfy.patcher_extension.WrappersMP.OUTER_SAMPLE,
                            window_of)
    managed = manage_sae_weights(patched, spec.sae)
    logger.info("%s: patched %s (%s) with %s; SAE weights %s", kind, key, getattr(spec.sae, "source", "SAE"), edit,
                "managed by ComfyUI with the model" if managed else "cast lazily per device")
    return patched, state


def _node_id(cls):
    hidden = getattr(cls, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None


class LoadSAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAELoad",
            display_name="Load SAE",
            category=CATEGORY,
            description="Load a sparse autoencoder trained on one UNet block: a native .safetensors file or a "
                        "sparsify / SAELens / sdxl-unbox checkpoint directory from models/sae.",
            inputs=[
                io.Combo.Input("sae_name", options=folders.list_sae_entries(folder_paths),
                               tooltip="SAE file or checkpoint directory (ending in /) in models/sae."),
                io.Combo.Input("block", options=[FROM_FILE, *_block_names()], default=FROM_FILE,
                               tooltip="UNet block the SAE was trained on (diffusers name). 'from file' uses the "
                                       "hook point recorded in the checkpoint."),
                io.Combo.Input("model_family", options=[FROM_FILE, *FAMILIES], default=FROM_FILE,
                               tooltip="Model family the SAE was trained on (sd1 = SD 1.x, sdxl = SDXL/Turbo). "
                                       "'from file' uses the checkpoint's record (or none: not checked)."),
                io.Combo.Input("input_space", options=[FROM_FILE, *INPUT_SPACES], default=FROM_FILE,
                               tooltip="What the SAE reads: 'output' = block output (SAeUron), 'residual' = "
                                       "output - input (sdxl-unbox)."),
                io.Combo.Input("activation", options=[FROM_FILE, *sorted(ACTIVATIONS)], default=FROM_FILE,
                               tooltip="Override the activation when the format does not record it (G-SAE needs "
                                       "sigmoid_topk)."),
            ],
            outputs=[SAEType.Output(display_name="SAE", tooltip="The loaded sparse autoencoder.")],
        )

    @classmethod
    def execute(cls, sae_name: str, block: str, model_family: str, input_space: str, activation: str) -> io.NodeOutput:
        path = folders.resolve_sae_entry(folder_paths, sae_name)
        overrides = {k: v for k, v in (("hook_point", block), ("model_family", model_family),
                                       ("input_space", input_space), ("activation", activation)) if v != FROM_FILE}
        # ComfyUI runs nodes under torch.inference_mode(); parameters created there are inference tensors,
        # which have no version counter (the core's weight cache and fingerprint read it)
        with torch.inference_mode(False):
            sae = load_sae(path, **overrides)
        sae.eval()
        return io.NodeOutput(sae)


class ConceptDetectorNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAEConceptDetector",
            display_name="Concept Detector",
            category=CATEGORY,
            description="Turn concepts (learned or typed latent ids) into a per-patch detector: a patch is "
                        "detected where a selected latent fires above threshold_scale times its threshold.",
            inputs=[
                SAEType.Input("sae", tooltip="The SAE the concepts were learned with."),
                ConceptType.Input("concept", optional=True, tooltip="A concept (all concepts in it are used)."),
                ConceptType.Input("concept_2", optional=True, tooltip="A further concept; detections are united."),
                ConceptType.Input("concept_3", optional=True, tooltip="A further concept; detections are united."),
                io.String.Input("latent_ids", default="", tooltip="Typed latent ids (e.g. '12, 40'), used in "
                                "addition to the concepts; empty = none."),
                io.Float.Input("typed_threshold", default=0.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="Threshold of typed latents: detected where the latent exceeds it "
                                       "(0 = wherever it is active at all)."),
                io.Float.Input("threshold_scale", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Multiplies every threshold: larger detects fewer patches, 0 detects every "
                                       "patch where a selected latent is active."),
                io.Int.Input("padding", default=1, min=0, max=16,
                             tooltip="Dilate the mask by this many patches (0 = exact detections)."),
                io.Int.Input("min_region", default=0, min=0, max=4096,
                             tooltip="Drop detected regions smaller than this many patches (0/1 keeps all)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Act from this point of the sampling schedule (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Act until this point of the schedule (1 = last step)."),
                io.Combo.Input("branches", options=list(BRANCH_OPTIONS), default="both",
                               tooltip="CFG branches to detect and edit: cond (positive), uncond (negative) or both."),
                io.Boolean.Input("presence_gate", default=True,
                                 tooltip="Edit an image only once the concept is clearly present (the share of "
                                         "detected patches learned with the concept); images without it stay "
                                         "bit-identical. Concepts saved before the gate existed, and typed "
                                         "latents, are never gated: learn them again to get a gate."),
                io.Combo.Input("temporal", options=list(TEMPORAL_MODES), default="none",
                               tooltip="none: each step's mask alone; sticky: a patch once detected stays detected "
                                       "for the rest of the run."),
            ],
            outputs=[DetectorType.Output(display_name="DETECTOR", tooltip="Connect to Patch Replacer or SAE Steer.")],
        )

    @classmethod
    def execute(cls, sae, latent_ids: str, typed_threshold: float, threshold_scale: float, padding: int,
                min_region: int, start_percent: float, end_percent: float, branches: str, concept=None,
                concept_2=None, concept_3=None, presence_gate: bool = True, temporal: str = "none") -> io.NodeOutput:
        sources = [(c, None) for c in (concept, concept_2, concept_3) if c is not None]
        ids = parse_latent_ids(latent_ids)
        if ids:
            typed = ConceptDictionary.from_latents(ids, int(sae.cfg.n_latents), threshold=typed_threshold,
                                                   name="typed", sae_fingerprint=sae.fingerprint())
            sources.append((typed, None))
        if not sources:
            raise SAEInputError("Concept Detector: no concept connected and no latent ids typed; connect a CONCEPT "
                             "(Learn Concept / Load Concept) or type latent ids")
        check_window(start_percent, end_percent)
        settings = DetectionSettings(threshold_scale=threshold_scale, padding=padding, min_region=min_region,
                                     gate=bool(presence_gate), temporal=temporal)
        ungated = [d.names for d, _ in sources if not d.has_gate]
        if presence_gate and ungated:
            logger.warning("Concept Detector: %s carry no presence gate (typed latents, or a concept file saved "
                           "before the gate existed); they are not gated. Learn them again to get one", ungated)
        det = ConceptDetector(sources, settings, sae=sae)
        return io.NodeOutput(DetectorSpec(sae, det, branches, start_percent, end_percent))


class PatchReplacer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAEPatchReplacer",
            hidden=[io.Hidden.unique_id],
            display_name="Patch Replacer",
            category=CATEGORY,
            description="PER: detected patch embeddings of the SAE's block are replaced by embeddings sampled "
                        "from undetected patches of the same feature map; no latent is edited.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (it is cloned, never changed)."),
                DetectorType.Input("detector", tooltip="From Concept Detector."),
                io.Combo.Input("mode", options=list(MODES), default="background",
                               tooltip="random: a random undetected patch (the paper's); nearest: the closest "
                                       "undetected patch; mean: the mean of the undetected patches; background: the "
                                       "closest of the typical undetected patches (near their median), so other "
                                       "objects are never copied into the hole."),
                io.Combo.Input("target", options=["output", "residual"], default="output",
                               tooltip="output: copy whole block-output vectors; residual: copy only the block's "
                                       "residual update (keeps the detected patch's own input)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the random source choice (same seed, same choice per step)."),
                io.Boolean.Input("look_ahead", default=True,
                                 tooltip="Sample twice from the same noise: first detect only, then replace with the "
                                         "first pass's masks from the very first step (the layout is decided early, "
                                         "masks form later) and only in images where the concept's presence gate "
                                         "opened on most steps (the others stay bit-identical). About twice the "
                                         "sampling time; no gain for one-step models (off = one pass, the paper's)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The patched model; sample it with a KSampler."),
                DetectionsType.Output(display_name="DETECTIONS", tooltip="Masks recorded during sampling, for Mask Preview."),
            ],
        )

    @classmethod
    def execute(cls, model, detector: DetectorSpec, mode: str, target: str, seed: int,
                look_ahead: bool = True) -> io.NodeOutput:
        patched, state = _patch(model, detector, ReplaceSettings(mode=mode, seed=seed, target=target), "Patch Replacer",
                                _node_id(cls), lookahead=LookAheadSettings() if look_ahead else None)
        return io.NodeOutput(patched, state)


class SAESteer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAESteer",
            hidden=[io.Hidden.unique_id],
            display_name="SAE Steer",
            category=CATEGORY,
            description="Steer the SAE latents of the detected concept (SAeUron scaling, set, sdxl-unbox add, "
                        "G-SAE add) and map back with an error term, for comparison with Patch Replacer.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (it is cloned, never changed)."),
                DetectorType.Input("detector", tooltip="From Concept Detector."),
                io.Combo.Input("method", options=list(METHODS), default="saeuron_scale",
                               tooltip="saeuron_scale: f <- f * strength * mu (negative ablates); set: f <- strength; "
                                       "unbox_add: add strength * mean * direction; gsae_add: add strength * ||x|| * unit direction."),
                io.Float.Input("strength", default=-1.0, min=-1000.0, max=1000.0, step=0.1,
                               tooltip="gamma / value / multiplier of the method; 0 with 'add' methods changes nothing."),
                io.Combo.Input("error", options=list(ERROR_MODES), default="preserve",
                               tooltip="preserve: x + decode(f') - decode(f) (untouched patches exact); legacy_saeuron: "
                                       "the published SAeUron/SAEmnesia hook with its sign slip, which moves every "
                                       "patch: it always edits every patch and ignores detected_only, so it "
                                       "reproduces the published numbers; none: pure reconstruction."),
                io.Boolean.Input("detected_only", default=True,
                                 tooltip="Edit only detected patches (on) or every patch (off). Ignored with error "
                                         "legacy_saeuron, which moves every patch as published."),
                io.Boolean.Input("use_beta", default=False, optional=True,
                                 tooltip="saeuron_scale only: SAEmnesia's multiplier strength * ||f|| / ||d_i|| (code "
                                         "norm of the patch over the latent's decoder norm) instead of strength * mu."),
                io.Combo.Input("cfg_sign", options=list(CFG_SIGNS), default="same", optional=True,
                               tooltip="Add methods: 'same' adds on both CFG branches; 'opposite' subtracts on the "
                                       "uncond branch and adds on the cond one (sdxl-unbox on SDXL base)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional painted region (any resolution; resized to the block's grid, a patch "
                                      "counts where at least half of it is painted)."),
                io.Combo.Input("mask_mode", options=list(REGION_MODES), default="intersect", optional=True,
                               tooltip="With a mask: 'intersect' edits detected patches inside it only; 'replace' "
                                       "edits the painted patches whatever the detector finds."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The patched model; sample it with a KSampler."),
                DetectionsType.Output(display_name="DETECTIONS", tooltip="Masks recorded during sampling, for Mask Preview."),
            ],
        )

    @classmethod
    def execute(cls, model, detector: DetectorSpec, method: str, strength: float, error: str,
                detected_only: bool, use_beta: bool = False, cfg_sign: str = "same", mask=None,
                mask_mode: str = "intersect") -> io.NodeOutput:
        edit = steer_settings(method, strength, error, detected_only, use_beta, cfg_sign)
        patched, state = _patch(model, detector, edit, "SAE Steer", _node_id(cls), region=mask, region_mode=mask_mode)
        return io.NodeOutput(patched, state)


class MaskPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAEMaskPreview",
            display_name="Mask Preview",
            category=CATEGORY,
            description="Overlay the recorded detection mask or score map on the decoded image, for one step or "
                        "aggregated over steps; also outputs it as a MASK at image resolution.",
            is_output_node=True,
            inputs=[
                DetectionsType.Input("detections", tooltip="From Patch Replacer or SAE Steer (after sampling)."),
                io.Image.Input("images", tooltip="The decoded images of that sampling run (VAE Decode)."),
                io.Int.Input("step", default=-1, min=-1, max=10000,
                             tooltip="Sampling step to show (0 = first); -1 aggregates over all recorded steps."),
                io.Combo.Input("aggregate", options=list(AGGREGATES), default="max",
                               tooltip="With step -1: max = detected at any step, mean = share of steps, last = final step."),
                io.Combo.Input("branch", options=["cond", "uncond"], default="cond",
                               tooltip="CFG branch whose detections are shown."),
                io.Combo.Input("show", options=list(SHOW), default="mask",
                               tooltip="mask: detected patches; score: detection margin scaled to 0..1."),
                io.Float.Input("opacity", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="0 = the image unchanged, 1 = detected patches fully coloured."),
                io.String.Input("color", default="#ff2020", tooltip="Overlay colour as hex (#rrggbb)."),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The image with the overlay."),
                io.Mask.Output(display_name="MASK", tooltip="The map at image resolution (0..1), usable by mask nodes."),
            ],
        )

    @classmethod
    def execute(cls, detections: RunState, images, step: int, aggregate: str, branch: str, show: str,
                opacity: float, color: str) -> io.NodeOutput:
        rec = detections.recorder
        if rec is None or not rec.records:
            found = getattr(detections, "warnings", None)
            if found:
                raise SAEInputError(f"Mask Preview: {found[-1]}")
            raise SAEInputError(
                f"Mask Preview: {detections.label} recorded nothing; sample the patched model first (connect "
                "images decoded from that KSampler) and check start/end percent and branches"
            )
        n, h, w = images.shape[:3]
        maps, per_image = [], []
        for i in range(n):
            keys, m = recorded_maps(rec, show, branch, image=i)
            per_image.append((keys, normalise(m) if show == "score" else m))  # every step, for the scrubber
            one = pick_step(keys, m, step, aggregate)
            maps.append(normalise(one) if show == "score" else one)
        full = upscale(torch.stack(maps), h, w).to(images.device, torch.float32)
        out = overlay(images, full.to(images.dtype), parse_color(color), opacity)
        payload = mask_step_payload(images, per_image, parse_color(color), opacity, branch, show,
                                    folder_paths.get_temp_directory())
        return io.NodeOutput(out, full, ui={**ui.PreviewImage(out, cls=cls).as_dict(), **payload})


class LearnConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAELearnConcept",
            display_name="Learn Concept",
            category=CATEGORY,
            description="Generate the concept prompts and the contrast prompts, record the SAE codes of the cond "
                        "branch at every step, and select the concept's latents per timestep (SAeUron scores). "
                        "Cost: one full sampling per prompt, concept and contrast: (concept prompts + contrast "
                        f"prompts, up to {len(DEFAULT_CONTRAST)} built in) x steps CFG steps; the learn template "
                        "(14 samplings of 25 steps at 512 px) takes a minute or two on a GPU and about 85 minutes "
                        "on a CPU. Save the result with Save Concept and reuse it.",
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Model.Input("model", tooltip="The model the SAE was trained on."),
                io.Clip.Input("clip", tooltip="Text encoder of that model, to encode the prompts."),
                SAEType.Input("sae", tooltip="The SAE whose latents are scored."),
                io.String.Input("concept_name", default="concept", tooltip="Name stored in the concept file."),
                io.String.Input("concept_prompts", multiline=True, default="a photo of a cat",
                                tooltip="One prompt per line showing the concept; more prompts give steadier scores."),
                io.String.Input("contrast_prompts", multiline=True, default="",
                                tooltip="One prompt per line WITHOUT the concept; empty uses a built-in set of "
                                        f"{len(DEFAULT_CONTRAST)} generic scenes, minus any scene that names the "
                                        "concept (its name's words, or words all concept prompts share). Each "
                                        "prompt costs one full sampling."),
                io.String.Input("negative_prompt", default="", tooltip="Negative prompt for every run."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height in pixels."),
                io.Int.Input("steps", default=20, min=1, max=1000,
                             tooltip="Sampling steps; the concept stores one selection per step's timestep. Time "
                                     "grows with steps x number of prompts."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler used for the recording runs."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="Scheduler used for the recording runs."),
                io.Int.Input("seed", default=188, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Noise seed of every run (SAeUron uses 188)."),
                io.Combo.Input("selection", options=["percentile", "top_n", "specific"], default="top_n",
                               tooltip="percentile: latents above a score quantile (SAeUron); top_n: the n best; "
                                       "specific: up to top_n latents active on the concept's patches and at most a "
                                       "fifth as often without it (sharper masks for small objects)."),
                io.Float.Input("percentile", default=99.99, min=0.01, max=99.9999, step=0.001,
                               tooltip="For 'percentile': higher keeps fewer latents (99.99 of 20480 keeps 3)."),
                io.Int.Input("top_n", default=3, min=1, max=1000, tooltip="For 'top_n' and 'specific': latents kept per timestep (at most)."),
            ],
            outputs=[ConceptType.Output(display_name="CONCEPT", tooltip="Connect to Concept Detector or Save Concept.")],
        )

    @classmethod
    def execute(cls, model, clip, sae, concept_name: str, concept_prompts: str, contrast_prompts: str,
                negative_prompt: str, width: int, height: int, steps: int, cfg: float, sampler_name: str,
                scheduler: str, seed: int, selection: str, percentile: float, top_n: int) -> io.NodeOutput:
        name = concept_name.strip()
        if not name or name == CONTRAST_LABEL:
            raise SAEInputError(f"Learn Concept: concept_name {concept_name!r} is empty or reserved; type a name like 'cat'")
        prompts = parse_prompts(concept_prompts)
        if not prompts:
            raise SAEInputError("Learn Concept: concept_prompts is empty; type at least one prompt (one per line)")
        uid = cls.hidden.unique_id if cls.hidden is not None else None
        contrast = parse_prompts(contrast_prompts)
        words = sorted(concept_words(name, prompts))
        if contrast:
            naming = prompts_naming(contrast, set(words))
            if naming:
                _tell(uid, f"Learn Concept: contrast prompts {naming} contain the concept's words {words}; the "
                           "concept is then scored against itself and its latents score low. Remove them from "
                           "contrast_prompts unless that is intended")
        else:
            contrast, dropped = default_contrast(name, prompts)
            if dropped:
                _tell(uid, f"Learn Concept: left {dropped} out of the built-in contrast set: they name the concept "
                           f"({words}); {len(contrast)} built-in scenes used", level=logging.INFO)
        rule = SelectionRule(method=selection, percentile=percentile, top_n=top_n)
        key, block = resolve_hook(sae, model)
        family = family_of_config(model.model.model_config)
        # per-image codes kept for the presence gate (about 6 bytes x k per patch and step)
        acc = ConceptStatsAccumulator(int(sae.cfg.n_latents), fire_above=sae.firing_level, keep_samples=True,
                                      sample_top=int(sae.cfg.k) if getattr(sae.cfg, "k", None) else 64)
        collector = ConceptCollector(sae, acc, branches="cond", label=block)
        state = RunState("Learn Concept", None)
        patched = install_patch(model, key, collector, state, comfy.patcher_extension.WrappersMP.OUTER_SAMPLE)
        negative = _encode(clip, negative_prompt)
        jobs = [(name, p) for p in prompts] + [(CONTRAST_LABEL, p) for p in contrast]
        pbar = comfy.utils.ProgressBar(len(jobs) * steps, node_id=uid)

        def on_step(*_):
            pbar.update(1)
            comfy.model_management.throw_exception_if_processing_interrupted()

        for job, (label, prompt) in enumerate(jobs):
            comfy.model_management.throw_exception_if_processing_interrupted()
            collector.concept, collector.sample = label, job
            positive = _encode(clip, prompt)
            latent = torch.zeros([1, 4, height // 8, width // 8])
            latent = comfy.sample.fix_empty_latent_channels(patched, latent)
            noise = comfy.sample.prepare_noise(latent, seed, None)
            comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                denoise=1.0, callback=on_step, disable_pbar=True, seed=seed)
        concept = build_concept_dictionary(
            acc.stats(), rule, keep=[name], sae_fingerprint=sae.fingerprint(), hook_point=block,
            model_family=family, prompts={name: prompts, CONTRAST_LABEL: contrast},
        )
        concept = learn_presence_gate(concept, acc)
        return io.NodeOutput(concept)


def _tell(node_id, text: str, level: int = logging.WARNING) -> None:
    """Log ``text`` and show it under the node in the UI (a toast too when it is a warning)."""
    logger.log(level, "%s", text)
    try:
        server = _prompt_server()
        if server is None:
            return
        if level >= logging.WARNING:
            server.send_sync(WARNING_EVENT, {"node": node_id, "text": text})
        if node_id is not None and hasattr(server, "send_progress_text"):
            server.send_progress_text(text, node_id)
    except Exception as e:  # outside a server (tests, scripts) the log line is the message
        logger.debug("could not show the message in the UI: %s", e)


def _encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


class SaveConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAESaveConcept",
            display_name="Save Concept",
            category=CATEGORY,
            description="Save a concept to models/sae_concepts as a small .safetensors file to reuse or share.",
            is_output_node=True,
            inputs=[
                ConceptType.Input("concept", tooltip="From Learn Concept or Load Concept."),
                io.String.Input("filename", default="concept", tooltip="File name without folder; .safetensors is added."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name (off = refuse)."),
            ],
            outputs=[ConceptType.Output(display_name="CONCEPT", tooltip="The same concept, passed through.")],
        )

    @classmethod
    def execute(cls, concept, filename: str, overwrite: bool) -> io.NodeOutput:
        path = folders.concept_save_path(folder_paths, filename)
        if os.path.exists(path) and not overwrite:
            raise SAEFileExistsError(f"Save Concept: {path} exists; pick another filename or switch overwrite on")
        concept.save(path)
        return io.NodeOutput(concept, ui=ui.PreviewText(f"saved {list(concept.names)} to {path}"))


class LoadConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAELoadConcept",
            display_name="Load Concept",
            category=CATEGORY,
            description="Load a concept file from models/sae_concepts; with an SAE connected, check it was learned with it.",
            inputs=[
                io.Combo.Input("concept_name", options=folder_paths.get_filename_list(folders.CONCEPT_FOLDER),
                               tooltip="Concept file in models/sae_concepts."),
                SAEType.Input("sae", optional=True, tooltip="Optional: refuse the file if it was learned with another SAE."),
            ],
            outputs=[ConceptType.Output(display_name="CONCEPT", tooltip="Connect to Concept Detector.")],
        )

    @classmethod
    def execute(cls, concept_name: str, sae=None) -> io.NodeOutput:
        path = folder_paths.get_full_path(folders.CONCEPT_FOLDER, concept_name)
        if path is None:
            raise SAEFileNotFoundError(f"Load Concept: {concept_name!r} not found in models/{folders.CONCEPT_FOLDER} "
                                    f"({folder_paths.get_folder_paths(folders.CONCEPT_FOLDER)})")
        return io.NodeOutput(load_concepts(path, sae=sae))


class Compare(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAECompare",
            display_name="Compare",
            category=CATEGORY,
            description="Side-by-side grid of two or three image branches with labels (e.g. original, PER, steering).",
            is_output_node=True,
            inputs=[
                io.Image.Input("image_a", tooltip="First branch; sets the grid height."),
                io.Image.Input("image_b", tooltip="Second branch."),
                io.Image.Input("image_c", optional=True, tooltip="Optional third branch."),
                io.String.Input("label_a", default="original", tooltip="Label above the first branch."),
                io.String.Input("label_b", default="PER", tooltip="Label above the second branch."),
                io.String.Input("label_c", default="steer",
                                tooltip="Label above the third branch; unused while image_c is not connected."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The labelled grid.")],
        )

    @classmethod
    def execute(cls, image_a, image_b, label_a: str, label_b: str, label_c: str, image_c=None) -> io.NodeOutput:
        imgs, labels = [image_a, image_b], [label_a, label_b]
        if image_c is not None:
            imgs.append(image_c)
            labels.append(label_c)
        grid = compare_grid(imgs, labels)
        payload = compare_payload(imgs, labels, folder_paths.get_temp_directory())  # for the slider
        return io.NodeOutput(grid, ui={**ui.PreviewImage(grid, cls=cls).as_dict(), **payload})


NODES = [LoadSAE, ConceptDetectorNode, PatchReplacer, SAESteer, MaskPreview, LearnConcept, SaveConcept,
         LoadConcept, Compare, *TRAIN_NODES]


class SAEExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> SAEExtension:
    folders.register(folder_paths)
    return SAEExtension()


def _serve_thumbnails() -> None:
    """Template thumbnails at the URL the frontend asks, on old and new backends (see nodes/templates.py)."""
    server = _prompt_server()
    if server is not None:
        register_thumbnail_route(server, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


folders.register(folder_paths)  # also at import, so the lists in define_schema see the folders
_serve_thumbnails()
