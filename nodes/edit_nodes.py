"""Patch Replacer (PER) and SAE Steer: patch the model's SAE block with the detector and an edit."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..sae_core.intervention import HOLES, KEEP_REST, REGION_MODES, ReplaceSettings
from ..sae_core.lookahead import LookAheadSettings
from ..sae_core.replace import MODES
from ..sae_core.steer import CFG_SIGNS, ERROR_MODES, METHODS
from .common import CATEGORY, DetectionsType, DetectorSpec, DetectorType, node_id_of, tell
from .patching import patch_model
from .resolve import steer_settings


def _patch_inputs() -> list:
    """What both patching nodes take first: the model and the detector."""
    return [io.Model.Input("model", tooltip="The model to patch (it is cloned, never changed)."),
            DetectorType.Input("detector", tooltip="From Concept Detector.")]


def _patch_outputs() -> list:
    """What both patching nodes return: the patched model and its run's detections."""
    return [io.Model.Output(display_name="MODEL", tooltip="The patched model; sample it with a KSampler."),
            DetectionsType.Output(display_name="DETECTIONS", tooltip="Masks recorded during sampling, for Mask Preview.")]


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
                *_patch_inputs(),
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
                io.Boolean.Input("denoised_fill", default=True, optional=True,  # API prompts saved before keep working
                                 tooltip="With look_ahead: also fill the detected cells of the sampler's denoised "
                                         "prediction (the picture each step aims at) from background cells, at every "
                                         "step, with sources and their values fixed from the first pass's picture. "
                                         "Stops the model redrawing the erased object as a grey or muddy ghost. "
                                         "Ignored without look_ahead (the node says so)."),
                io.Combo.Input("keep_rest", options=list(KEEP_REST), default="all", optional=True,
                               tooltip="With the denoised fill: what stays as the unedited sampling draws it (the "
                                       "first pass's prediction at every step). all: everything outside the erased "
                                       "cells, so only the hole changes; objects: only the other objects the first "
                                       "pass drew (the background around may change); off: the model may redraw "
                                       "anything (neighbours can lose or take the erased object's shape)."),
                io.Combo.Input("hole", options=list(HOLES), default="object", optional=True,
                               tooltip="With the denoised fill: which pixels of the erased cells are filled. object: "
                                       "the detected cells, and in the mask's padding only the pixels that hold the "
                                       "detected object in the first pass's picture (connected to it, like it rather "
                                       "than the background, grown by one pixel), so a neighbour inside the padding "
                                       "keeps its pixels; cells: every pixel of the padded cells (the fill before "
                                       "this option)."),
            ],
            outputs=_patch_outputs(),
        )

    @classmethod
    def execute(cls, model, detector: DetectorSpec, mode: str, target: str, seed: int,
                look_ahead: bool = True, denoised_fill: bool = True, keep_rest: str = "all",
                hole: str = "object") -> io.NodeOutput:
        node_id = node_id_of(cls)
        if denoised_fill and not look_ahead:
            tell(node_id, "denoised_fill is off: it fills the look-ahead pass's masks, and look_ahead is off"
                 + (f" (so keep_rest {keep_rest!r} is off too)" if keep_rest != "off" else ""), level=logging.INFO)
        elif look_ahead and not denoised_fill and keep_rest != "off":
            tell(node_id, f"keep_rest {keep_rest!r} is ignored: it keeps the picture around the denoised fill's "
                 "hole, and denoised_fill is off", level=logging.INFO)
        edit = ReplaceSettings(mode=mode, seed=seed, target=target, denoised=bool(denoised_fill and look_ahead),
                               keep_rest=keep_rest, hole=hole)
        patched, state = patch_model(model, detector, edit, "Patch Replacer", node_id,
                                     lookahead=LookAheadSettings() if look_ahead else None)
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
                *_patch_inputs(),
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
            outputs=_patch_outputs(),
        )

    @classmethod
    def execute(cls, model, detector: DetectorSpec, method: str, strength: float, error: str,
                detected_only: bool, use_beta: bool = False, cfg_sign: str = "same", mask=None,
                mask_mode: str = "intersect") -> io.NodeOutput:
        edit = steer_settings(method, strength, error, detected_only, use_beta, cfg_sign)
        patched, state = patch_model(model, detector, edit, "SAE Steer", node_id_of(cls), region=mask, region_mode=mask_mode)
        return io.NodeOutput(patched, state)
