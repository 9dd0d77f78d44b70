"""ComfyUI nodes to make an SAE for the loaded model: Collect Activations (prompts -> dataset folder) and Train SAE
(dataset folder -> models/sae). Thin adapters over sae_core.collect, sae_core.dataset and sae_core.trainer.

Training in the UI and the queue: ComfyUI runs one prompt at a time, so a node that trains blocks everything
queued after it. Train SAE therefore takes ``max_minutes``: when that time is spent it writes a checkpoint and the
SAE as it stands (provenance ``finished: false``) and returns, so the queue moves on; queue it again with
``resume`` on to continue exactly where it stopped. Cancel (interrupt) also writes the checkpoint first.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import comfy.model_management
import comfy.patcher_extension
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..sae_core.blocks import BlockError, resolve_block
from ..sae_core.collect import ActivationRecorder, CollectSettings, model_fingerprint
from ..sae_core.dataset import ActivationDataset, ShardWriter
from ..sae_core.formats import save_native
from ..sae_core.trainer import StreamConfig, train_stream
from . import folders
from .common import block_names
from .hook import install_patch
from .learn import parse_prompts
from .resolve import family_of_config
from .run_state import RunState
from .sampling import sample_prompts, sampling_inputs

logger = logging.getLogger(__name__)

CATEGORY = "SAE/train"
DATASET_FOLDER = "sae_datasets"  # under ComfyUI's output directory
SAEType = io.Custom("SAE")
DatasetType = io.Custom("SAE_DATASET")  # a dataset folder path; a socket type, so Train SAE runs after Collect


def dataset_root() -> Path:
    return Path(folder_paths.get_output_directory()) / DATASET_FOLDER


def resolve_dataset(name: str) -> Path:
    """A dataset name (folder under output/sae_datasets) or an absolute folder path."""
    name = name.strip()
    if not name:
        raise ValueError("dataset is empty; type the name given to Collect Activations (or a folder path)")
    p = Path(name)
    if p.is_absolute():
        return p
    if ".." in p.parts:
        raise ValueError(f"dataset {name!r}: a name under output/{DATASET_FOLDER} may not contain '..'; give an absolute "
                         "folder path instead")
    return dataset_root() / name


def _block_key(model, block: str) -> tuple[str, str]:
    family = family_of_config(model.model.model_config)
    if family is None:
        raise ValueError(f"Collect Activations: the model is {type(model.model.model_config).__name__}, expected an SD 1.x "
                         "or SDXL UNet (sd1, sdxl), FLUX.1 (flux) or SD3 / SD3.5 (sd3, sd35large)")
    try:
        spec = resolve_block(block, family)
    except BlockError as e:
        raise ValueError(f"Collect Activations: {e}") from None
    try:
        model.get_model_object(spec.comfy_key)
    except AttributeError:
        raise ValueError(f"Collect Activations: block {spec.diffusers} ({spec.comfy_key}) does not exist in this "
                         f"{family} model") from None
    return spec.comfy_key, spec.diffusers


class CollectActivations(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAECollectActivations",
            display_name="Collect Activations",
            category=CATEGORY,
            description="Sample the model over prompts and record one block's activations (cond branch by default) "
                        "into a dataset folder (output/sae_datasets/NAME: safetensors shards + manifest.json) for "
                        "Train SAE or `python -m sae_core train`. Memory stays bounded by shard_rows.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Model.Input("model", tooltip="The model to make an SAE for."),
                io.Clip.Input("clip", tooltip="Its text encoder, to encode the prompts."),
                io.Combo.Input("block", options=block_names(), default="up_blocks.1.attentions.1",
                               tooltip="Block whose output is recorded (SAeUron: up_blocks.1.attentions.1 for objects)."),
                io.String.Input("prompts", multiline=True, default="a photo of a cat\na photo of a dog",
                                tooltip="One prompt per line; more and more varied prompts give a better SAE."),
                io.String.Input("negative_prompt", default="", tooltip="Negative prompt for every run."),
                io.String.Input("dataset_name", default="my_sae_data",
                                tooltip="Folder name under output/sae_datasets (or an absolute folder path)."),
                *sampling_inputs("Sampling steps; every step is recorded.", "of the recording runs", 0,
                                 "Noise seed of the first prompt; prompt i uses seed + i."),
                io.Combo.Input("input_space", options=["output", "residual"], default="output",
                               tooltip="output: the block output (SAeUron); residual: output minus input (sdxl-unbox)."),
                io.Combo.Input("branches", options=["cond", "uncond", "both"], default="cond",
                               tooltip="CFG branches recorded (SAeUron records cond)."),
                io.Int.Input("patches_per_map", default=0, min=0, max=65536,
                             tooltip="Random patch positions kept per map and step; 0 keeps all (more data, more disk)."),
                io.Int.Input("shard_rows", default=262144, min=1024, max=16_777_216,
                             tooltip="Rows per shard file; bounds memory (shard_rows x channels x 2 bytes)."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing dataset of that name."),
            ],
            outputs=[DatasetType.Output(display_name="DATASET", tooltip="The dataset folder; connect to Train SAE.")],
        )

    @classmethod
    def execute(cls, model, clip, block: str, prompts: str, negative_prompt: str, dataset_name: str, width: int,
                height: int, steps: int, cfg: float, sampler_name: str, scheduler: str, seed: int, input_space: str,
                branches: str, patches_per_map: int, shard_rows: int, overwrite: bool) -> io.NodeOutput:
        lines = parse_prompts(prompts)
        if not lines:
            raise ValueError("Collect Activations: prompts is empty; type at least one prompt (one per line)")
        key, name = _block_key(model, block)
        folder = resolve_dataset(dataset_name)
        settings = CollectSettings(input_space=input_space, branches=branches,
                                   patches_per_map=patches_per_map or None, shard_rows=shard_rows, seed=seed)
        meta = {"model": {"id": None, "fingerprint": model_fingerprint(model.model.diffusion_model),
                          "class": type(model.model.model_config).__name__,
                          "family": family_of_config(model.model.model_config)},
                "block": name, "input_space": input_space, "branches": branches, "prompts": lines,
                "sampler": {"host": "comfyui", "sampler": sampler_name, "scheduler": scheduler, "steps": steps,
                            "guidance": cfg, "width": width, "height": height, "seed": seed,
                            "negative_prompt": negative_prompt}}
        writer = ShardWriter(folder, shard_rows, settings.dtype, meta, overwrite=overwrite)
        rec = ActivationRecorder(writer, settings, label=name)
        patched = install_patch(model, key, rec, RunState("Collect Activations"),
                                comfy.patcher_extension.WrappersMP.OUTER_SAMPLE)
        uid = cls.hidden.unique_id if cls.hidden is not None else None
        t0 = time.time()
        sample_prompts(patched, clip, [(prompt, seed + i) for i, prompt in enumerate(lines)], negative_prompt, width,
                       height, steps, cfg, sampler_name, scheduler, uid)
        m = writer.close(recorder=rec.summary())
        text = (f"{m['rows']} rows x {m['d_in']} channels of {name} in {len(m['shards'])} shard(s) -> {folder} "
                f"({time.time() - t0:.0f} s)")
        return io.NodeOutput(str(folder), ui=ui.PreviewText(text))


class TrainSAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAETrainSAE",
            display_name="Train SAE",
            category=CATEGORY,
            description="Train a ReLU-TopK SAE (AuxK, unit-norm decoder) on a dataset from Collect Activations and "
                        "save it to models/sae. Stops after max_minutes (checkpoint + the SAE so far) so the queue "
                        "moves on; queue again with resume on to continue. Cancel keeps the last checkpoint too.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.String.Input("dataset", default="my_sae_data",
                                tooltip="Dataset name under output/sae_datasets, or a folder path (DATASET output)."),
                io.String.Input("sae_name", default="my_sae",
                                tooltip="File name in models/sae (.safetensors added); the checkpoint sits beside it."),
                io.Int.Input("latents", default=4096, min=16, max=1_048_576,
                             tooltip="Dictionary size M; SAeUron uses 20480 for SD 1.5 (more = finer concepts, slower)."),
                io.Int.Input("k", default=32, min=1, max=1024, tooltip="Latents kept per patch (more = lower error, "
                                                                        "less sparse)."),
                io.Int.Input("steps", default=5000, min=1, max=10_000_000, tooltip="Optimizer steps in all."),
                io.Int.Input("batch_size", default=4096, min=16, max=1_048_576, tooltip="Patch vectors per step."),
                io.Float.Input("lr", default=0.0, min=0.0, max=1.0, step=0.00001,
                               tooltip="Adam learning rate; 0 uses 2e-4 / sqrt(M / 16384)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds initialisation and data order."),
                io.Int.Input("holdout_shards", default=1, min=0, max=1000,
                             tooltip="Last shards kept out of training and evaluated at the end."),
                io.Float.Input("max_minutes", default=10.0, min=0.0, max=100_000.0, step=0.5,
                               tooltip="Stop after this long and save (0 = no limit, which blocks the queue until done)."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue from the checkpoint of sae_name (same settings; steps may grow)."),
                io.Int.Input("checkpoint_every", default=500, min=0, max=1_000_000,
                             tooltip="Steps between checkpoints (0 = only when stopping or done)."),
                DatasetType.Input("dataset_in", optional=True,
                                  tooltip="DATASET of Collect Activations; when connected it replaces 'dataset' and "
                                          "training waits for the collection."),
            ],
            outputs=[SAEType.Output(display_name="SAE", tooltip="The trained SAE (also saved to models/sae).")],
        )

    @classmethod
    def execute(cls, dataset: str, sae_name: str, latents: int, k: int, steps: int, batch_size: int, lr: float,
                seed: int, holdout_shards: int, max_minutes: float, resume: bool, checkpoint_every: int,
                dataset_in: str | None = None) -> io.NodeOutput:
        ds = ActivationDataset.open(Path(dataset_in) if dataset_in else resolve_dataset(dataset))
        dst = Path(folders.sae_save_path(folder_paths, sae_name))
        ckpt = dst.with_suffix(".ckpt")
        if dst.exists() and not resume and not (ckpt / "checkpoint.pt").exists():
            raise FileExistsError(f"Train SAE: {dst} exists; pick another sae_name (or resume its run)")
        cfg = StreamConfig(n_latents=latents, k=k, steps=steps, batch_size=batch_size, lr=lr or None, seed=seed,
                           holdout_shards=holdout_shards, checkpoint_every=checkpoint_every, log_every=50)
        m = ds.manifest
        fam = (m.get("model") or {}).get("family")
        sae_config = {"input_space": m.get("input_space", "output"), "hook_point": m.get("block"), "model_family": fam,
                      "provenance": {"dataset": {x: m.get(x) for x in ("model", "block", "input_space", "branches",
                                                                       "rows", "sampler", "recorder")}
                                     | {"prompts": len(m.get("prompts") or []), "folder": ds.folder.name}}}
        uid = cls.hidden.unique_id if cls.hidden is not None else None
        pbar = comfy.utils.ProgressBar(steps, node_id=uid)
        device = comfy.model_management.get_torch_device()
        # ComfyUI runs nodes under inference_mode; training needs autograd
        with torch.inference_mode(False), torch.enable_grad():
            res = train_stream(ds, cfg, checkpoint_dir=ckpt, resume=resume, device=device,
                               should_stop=comfy.model_management.processing_interrupted,
                               max_seconds=max_minutes * 60 if max_minutes > 0 else None, sae_config=sae_config,
                               on_step=lambda s: pbar.update_absolute(s, steps))
        # a cancelled run has written its checkpoint; let ComfyUI report the interruption
        comfy.model_management.throw_exception_if_processing_interrupted()
        save_native(res.sae, dst)
        sae = res.sae  # built outside inference mode, as Load SAE builds its SAEs
        sae.source = str(dst)
        sae.eval()
        if res.finished:
            h = res.holdout
            text = f"saved {dst} after {res.step} steps" + (f"; held-out FVU {h['fvu']:.4f}, L0 {h['l0']:.1f}, dead "
                                                             f"{h['dead_fraction']:.3f}" if h else "")
        else:
            last = res.log[-1] if res.log else {}
            text = (f"stopped at step {res.step} of {steps} after {max_minutes:g} min (FVU {last.get('fvu', float('nan')):.4f}); "
                    f"saved the SAE so far to {dst}; queue again with resume on to continue")
        logger.info("Train SAE: %s", text)
        return io.NodeOutput(sae, ui=ui.PreviewText(text))


NODES = [CollectActivations, TrainSAE]
