"""Load SAE and Concept Detector: an SAE from models/sae, and the per-patch detector built on it."""

from __future__ import annotations

import logging

import folder_paths
import torch
from comfy_api.latest import io

from ..sae_core.blocks import FAMILIES
from ..sae_core.concepts import ConceptDictionary
from ..sae_core.config import ACTIVATIONS, INPUT_SPACES
from ..sae_core.detect import TEMPORAL_MODES, ConceptDetector, DetectionSettings
from ..sae_core.errors import SAEInputError
from ..sae_core.formats import load_sae
from . import folders
from .comfy_steps import check_window
from .common import (
    BRANCH_OPTIONS,
    CATEGORY,
    FROM_FILE,
    ConceptType,
    DetectorSpec,
    DetectorType,
    SAEType,
    block_names,
    node_id_of,
    tell,
)
from .learn import parse_latent_ids
from .resolve import min_share_hint

logger = logging.getLogger(__name__)


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
                io.Combo.Input("block", options=[FROM_FILE, *block_names()], default=FROM_FILE,
                               tooltip="UNet or DiT block the SAE was trained on (diffusers name; FLUX / SD3: "
                                       "transformer_blocks.N, single_transformer_blocks.N). 'from file' uses the "
                                       "hook point recorded in the checkpoint."),
                io.Combo.Input("model_family", options=[FROM_FILE, *FAMILIES], default=FROM_FILE,
                               tooltip="Model family the SAE was trained on (sd1 = SD 1.x, sdxl = SDXL/Turbo, flux = FLUX.1, "
                                       "sd3 = SD3 / SD3.5 Medium, sd35large = SD3.5 Large). "
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
            hidden=[io.Hidden.unique_id],
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
                # optional: API prompts and workflows saved before min_share existed keep working (0 = off)
                io.Float.Input("min_share", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Detect a patch only where the concept's latents above threshold carry at "
                                       "least this share of the patch's whole SAE code (0 = off). Neighbouring "
                                       "concepts share latents (a purple concept's also fire, weaker, on blue "
                                       "objects); the share keeps the patches the concept explains. Depends on the "
                                       "SAE's latents per patch k: about 0.8/k measured best on the Shapes world "
                                       "(0.2 for k=4); above 1/k objects can lose patches. Check with Mask "
                                       "Preview that the object stays covered."),
                ConceptType.Input("keep", optional=True,
                                  tooltip="A concept that must survive next to this one (learned with the same SAE): "
                                          "a patch is detected only where this detector's concepts explain at least "
                                          "as much of the patch's SAE code as the kept concept does. Erase the circle, "
                                          "keep the square beside it: neighbouring concepts share latents, so a "
                                          "detector also fires, weaker, on the other's objects."),
                ConceptType.Input("keep_2", optional=True, tooltip="A further concept to keep (each counts on its own)."),
                ConceptType.Input("keep_3", optional=True, tooltip="A further concept to keep (each counts on its own)."),
            ],
            outputs=[DetectorType.Output(display_name="DETECTOR", tooltip="Connect to Patch Replacer or SAE Steer.")],
        )

    @classmethod
    def execute(cls, sae, latent_ids: str, typed_threshold: float, threshold_scale: float, padding: int,
                min_region: int, start_percent: float, end_percent: float, branches: str, concept=None,
                concept_2=None, concept_3=None, presence_gate: bool = True, temporal: str = "none",
                min_share: float = 0.0, keep=None, keep_2=None, keep_3=None) -> io.NodeOutput:
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
                                     gate=bool(presence_gate), temporal=temporal, min_share=min_share)
        hint = min_share_hint(settings.min_share, sae.cfg.k)
        if hint:
            tell(node_id_of(cls), hint, level=logging.INFO)
        ungated = [d.names for d, _ in sources if not d.has_gate]
        if presence_gate and ungated:
            logger.warning("Concept Detector: %s carry no presence gate (typed latents, or a concept file saved "
                           "before the gate existed); they are not gated. Learn them again to get one", ungated)
        kept = [(c, None) for c in (keep, keep_2, keep_3) if c is not None]
        det = ConceptDetector(sources, settings, sae=sae, keep=kept or None)
        return io.NodeOutput(DetectorSpec(sae, det, branches, start_percent, end_percent))
