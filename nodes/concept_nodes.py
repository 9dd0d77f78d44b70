"""Learn Concept, Save Concept, Load Concept: a concept learned by sampling, and its file in models/sae_concepts."""

from __future__ import annotations

import logging
import os

import comfy.patcher_extension
import folder_paths
from comfy_api.latest import io, ui

from ..sae_core.collector import ConceptCollector
from ..sae_core.concept_stats import ConceptStatsAccumulator
from ..sae_core.concepts import load_concepts
from ..sae_core.errors import SAEFileExistsError, SAEFileNotFoundError, SAEInputError
from ..sae_core.gate import learn_presence_gate
from ..sae_core.selection import SelectionRule, build_concept_dictionary
from . import folders
from .common import CATEGORY, CONTRAST_LABEL, KEEP_LABEL, ConceptType, SAEType, tell
from .hook import install_patch
from .learn import (
    DEFAULT_CONTRAST,
    concept_words,
    default_contrast,
    keep_negatives,
    parse_prompts,
    prompts_naming,
    steps_without_latents,
)
from .resolve import family_of_config, resolve_hook
from .run_state import RunState
from .sampling import sample_prompts, sampling_inputs


class LearnConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAELearnConcept",
            display_name="Learn Concept",
            category=CATEGORY,
            description="Generate the concept prompts and the contrast prompts, record the SAE codes of the cond "
                        "branch at every step, and select the concept's latents per timestep (SAeUron scores). "
                        "Cost: one full sampling per prompt, concept, contrast and keep: (concept prompts + contrast "
                        f"prompts, up to {len(DEFAULT_CONTRAST)} built in, + keep prompts) x steps CFG steps; the "
                        "learn template (14 samplings of 25 steps at 512 px) takes a minute or two on a GPU and about "
                        "85 minutes on a CPU. Save the result with Save Concept and reuse it.",
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
                *sampling_inputs("Sampling steps; the concept stores one selection per step's timestep. Time grows "
                                 "with steps x number of prompts.", "used for the recording runs", 188,
                                 "Noise seed of every run (SAeUron uses 188)."),
                io.Combo.Input("selection", options=["percentile", "top_n", "specific"], default="top_n",
                               tooltip="percentile: latents above a score quantile (SAeUron); top_n: the n best; "
                                       "specific: up to top_n latents active on the concept's patches and at most "
                                       "max_ratio as often without it (sharper masks for small objects)."),
                io.Float.Input("percentile", default=99.99, min=0.01, max=99.9999, step=0.001,
                               tooltip="For 'percentile': higher keeps fewer latents (99.99 of 20480 keeps 3)."),
                io.Int.Input("top_n", default=3, min=1, max=1000, tooltip="For 'top_n' and 'specific': latents kept per timestep (at most)."),
                io.String.Input("keep_prompts", multiline=True, default="", optional=True,  # API prompts saved before keep working
                                tooltip="Things that must survive the erasure, one prompt per line (e.g. 'a blue car' "
                                        "when erasing purple). Each is sampled like a contrast prompt (one full "
                                        "sampling each) and joins the contrast set; with selection 'specific' a latent "
                                        "is kept only if it stays silent on each of these prompts on its own, not just "
                                        "on the contrast set's average. Empty: none."),
                io.Float.Input("max_ratio", default=SelectionRule.max_ratio, min=0.0, max=1.0, step=0.01,
                               optional=True,  # API prompts saved before it
                               tooltip="For 'specific': a kept latent fires at most this fraction as often without "
                                       "the concept as with it (and on each keep prompt). 0.2 keeps latents that "
                                       "are nearly silent elsewhere. When the concept's neighbours are connected "
                                       "to Concept Detector's keep inputs, the detector itself decides between "
                                       "them, and 0.5 also takes the latents the concept shares weakly with a "
                                       "neighbour (on the Shapes world: the square's detection IoU 0.27 -> 0.65)."),
            ],
            outputs=[ConceptType.Output(display_name="CONCEPT", tooltip="Connect to Concept Detector or Save Concept.")],
        )

    @classmethod
    def execute(cls, model, clip, sae, concept_name: str, concept_prompts: str, contrast_prompts: str,
                negative_prompt: str, width: int, height: int, steps: int, cfg: float, sampler_name: str,
                scheduler: str, seed: int, selection: str, percentile: float, top_n: int,
                keep_prompts: str = "", max_ratio: float = SelectionRule.max_ratio) -> io.NodeOutput:
        name = concept_name.strip()
        if not name or name in (CONTRAST_LABEL, KEEP_LABEL):
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
                tell(uid, f"Learn Concept: contrast prompts {naming} contain the concept's words {words}; the "
                       "concept is then scored against itself and its latents score low. Remove them from "
                       "contrast_prompts unless that is intended")
        else:
            contrast, dropped = default_contrast(name, prompts)
            if dropped:
                tell(uid, f"Learn Concept: left {dropped} out of the built-in contrast set: they name the concept "
                       f"({words}); {len(contrast)} built-in scenes used", level=logging.INFO)
        keep = parse_prompts(keep_prompts or "")
        if keep:
            naming = prompts_naming(keep, set(words))
            if naming:
                tell(uid, f"Learn Concept: keep prompts {naming} contain the concept's words {words}; the concept's "
                       "latents must then stay silent on the concept itself and few or none are kept. Remove them "
                       "from keep_prompts unless that is intended")
            if selection != "specific":
                tell(uid, f"Learn Concept: with selection {selection!r} the {len(keep)} keep prompt(s) only join the "
                       "contrast set; the check that each kept latent stays silent on every keep prompt on its own "
                       "needs selection 'specific'")
        if selection != "specific" and max_ratio != SelectionRule.max_ratio:
            tell(uid, f"Learn Concept: max_ratio {max_ratio} only applies to selection 'specific'; with "
                   f"{selection!r} it is ignored")
        rule = SelectionRule(method=selection, percentile=percentile, top_n=top_n, max_ratio=max_ratio)
        key, block = resolve_hook(sae, model)
        family = family_of_config(model.model.model_config)
        # per-image codes kept for the presence gate (about 6 bytes x k per patch and step)
        acc = ConceptStatsAccumulator(int(sae.cfg.n_latents), fire_above=sae.firing_level, keep_samples=True,
                                      sample_top=int(sae.cfg.k) if getattr(sae.cfg, "k", None) else 64)
        collector = ConceptCollector(sae, acc, branches="cond", label=block)
        state = RunState("Learn Concept", None)
        patched = install_patch(model, key, collector, state, comfy.patcher_extension.WrappersMP.OUTER_SAMPLE)
        # keep prompts are contrast runs (pooled contrast, the gate's contrast) whose sample ids are remembered
        jobs = [(name, p) for p in prompts] + [(CONTRAST_LABEL, p) for p in contrast + keep]
        keep_samples = list(range(len(jobs) - len(keep), len(jobs)))

        def before_run(job: int) -> None:
            collector.concept, collector.sample = jobs[job][0], job

        sample_prompts(patched, clip, [(p, seed) for _, p in jobs], negative_prompt, width, height, steps, cfg,
                       sampler_name, scheduler, uid, before_run)
        stats = acc.stats()
        negatives = keep_negatives(acc, keep_samples, stats.timesteps) if keep and selection == "specific" else None
        meta_prompts = {name: prompts, CONTRAST_LABEL: contrast, **({KEEP_LABEL: keep} if keep else {})}
        concept = build_concept_dictionary(
            stats, rule, keep=[name], sae_fingerprint=sae.fingerprint(), hook_point=block,
            model_family=family, prompts=meta_prompts, negatives=negatives,
        )
        empty = steps_without_latents(concept)
        if empty:
            T = concept.timesteps.numel()
            hint = ("Use fewer keep prompts (or ones less like the concept), or more concept prompts"
                    if negatives is not None else
                    "Use more concept prompts" + (", a larger max_ratio, or selection 'top_n'" if selection == "specific" else
                                                  ", or a lower percentile or selection 'top_n'"))
            tell(uid, f"Learn Concept: concept {name!r} selects no latent at {len(empty)} of {T} steps (step indices "
                   f"{empty[:8]}{'...' if len(empty) > 8 else ''}); nothing will be detected there. {hint}")
        concept = learn_presence_gate(concept, acc)
        return io.NodeOutput(concept)


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
