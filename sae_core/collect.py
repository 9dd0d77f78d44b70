"""Activation collection: a recording block intervention (ActivationRecorder) that writes a dataset folder
(sae_core.dataset), and the driver that runs a diffusers pipeline over prompts with it.

Memory is bounded by one shard buffer (``shard_rows`` x d) plus the rows of one block call.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from .blocks import family_from_diffusers
from .dataset import DTYPES, ShardWriter
from .errors import SAEConfigError, SAEFormatError
from .mixins import SharedOnCopy
from .steps import BRANCHES, StepInfo, chunk_rows

logger = logging.getLogger(__name__)

def model_fingerprint(model: nn.Module, sample: int = 4096) -> str:
    """A stable hash of a module's parameter names, shapes, dtypes and a strided sample of every tensor's values
    (``sample`` values each), so an SD 1.5 UNet hashes in well under a second and a fine-tune hashes differently."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            stride = max(1, flat.numel() // sample)
            h.update(flat[::stride].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CollectSettings:
    """What one recording intervention keeps of each block call."""

    input_space: str = "output"
    """"output": the block output (SAeUron); "residual": output minus input (sdxl-unbox)."""
    branches: str = "cond"
    """CFG branches recorded: cond, uncond or both."""
    step_indices: tuple[int, ...] | None = None
    """Denoising step indices recorded (0 = first step); None records every step."""
    patches_per_map: int | None = None
    """Random patch positions kept per feature map and step (without replacement); None keeps all."""
    shard_rows: int = 262_144
    """Rows per shard file, which also bounds the collector's buffer (shard_rows x d values)."""
    dtype: str = "float16"
    """Storage dtype of the rows: float16, bfloat16 or float32."""
    seed: int = 0
    """Seed of the patch subsampling."""

    def __post_init__(self) -> None:
        if self.input_space not in ("output", "residual"):
            raise SAEConfigError(f"CollectSettings.input_space: expected 'output' or 'residual', found {self.input_space!r}")
        if self.branches not in BRANCHES:
            raise SAEConfigError(f"CollectSettings.branches: expected one of {list(BRANCHES)}, found {self.branches!r}")
        if self.patches_per_map is not None and self.patches_per_map < 1:
            raise SAEConfigError(f"CollectSettings.patches_per_map: expected >= 1 or None, found {self.patches_per_map}")
        if self.shard_rows < 1:
            raise SAEConfigError(f"CollectSettings.shard_rows: expected >= 1, found {self.shard_rows}")
        if self.dtype not in DTYPES:
            raise SAEConfigError(f"CollectSettings.dtype: expected one of {list(DTYPES)}, found {self.dtype!r}")
        if self.step_indices is not None:
            object.__setattr__(self, "step_indices", tuple(sorted({int(s) for s in self.step_indices})))


class ActivationRecorder(SharedOnCopy):
    """A BlockIntervention that records and changes nothing: (block_in, block_out, step) -> block_out.

    Keeps the rows of the chosen CFG branches at the chosen steps, optionally a random subset of patch positions
    per map, as channels-last vectors [n, d] (``b c h w`` feature maps or ``b n c`` token sequences), and hands
    them to ``writer``. Usable on both hosts: ``sae_core.torch_hooks.attach_interventions`` and the ComfyUI hook.
    Shared on copy: every clone of the patched model must write into the one writer.
    """

    def __init__(self, writer: ShardWriter, settings: CollectSettings = CollectSettings(), label: str = "block"):
        self.writer, self.settings, self.label = writer, settings, label
        self.branches = BRANCHES[settings.branches]
        self.gen = torch.Generator().manual_seed(int(settings.seed))
        self.calls = 0
        self.grid: tuple[int, ...] | None = None
        self.timesteps: set[float] = set()

    @property
    def needs_block_in(self) -> bool:
        """Hosts keep a copy of the block input only when it is read (DiT blocks modify theirs in place)."""
        return self.settings.input_space == "residual"

    def __call__(self, block_in: Tensor | None, block_out: Tensor, step: StepInfo) -> Tensor:
        s = self.settings
        if s.step_indices is not None:
            if step.step_index is None:
                raise ValueError(
                    f"ActivationRecorder({self.label}): step_indices are set but the host gives no step index; pass the "
                    "run's schedule to the host (track_timestep(..., schedule=...)) or record every step"
                )
            if step.step_index not in s.step_indices:
                return block_out
        if s.input_space == "residual" and (block_in is None or block_in.shape != block_out.shape):
            raise ValueError(
                f"ActivationRecorder({self.label}): residual recording needs the block input with the output's shape "
                f"{tuple(block_out.shape)}, found {None if block_in is None else tuple(block_in.shape)}"
            )
        parts = chunk_rows(block_out.shape[0], step.chunks, self.branches)
        if not parts:
            return block_out
        with torch.no_grad():
            idx = torch.cat([torch.arange(p.start, p.stop) for p in parts]).to(block_out.device)
            a = block_out.index_select(0, idx)
            if s.input_space == "residual":
                a = a - block_in.index_select(0, idx)
            if a.ndim == 4:
                self.grid = tuple(a.shape[2:])
                a = rearrange(a, "b c h w -> b (h w) c")
            elif a.ndim != 3:
                raise ValueError(
                    f"ActivationRecorder({self.label}): block output has shape {tuple(block_out.shape)}, expected "
                    "[B, C, H, W] feature maps or [B, N, C] tokens"
                )
            b, n, _ = a.shape
            if s.patches_per_map is not None and s.patches_per_map < n:
                keep = torch.stack([torch.randperm(n, generator=self.gen)[: s.patches_per_map] for _ in range(b)])
                a = torch.gather(a, 1, keep.to(a.device)[..., None].expand(-1, -1, a.shape[-1]))
            self.writer.add(a.reshape(-1, a.shape[-1]).to("cpu", self.writer.dtype))
        self.calls += 1
        self.timesteps.add(round(float(step.timestep), 4))
        return block_out

    def summary(self) -> dict[str, Any]:
        """What the recorder saw, for the manifest."""
        return {"settings": asdict(self.settings), "block_calls": self.calls, "grid": None if self.grid is None else list(self.grid),
                "timesteps": sorted(self.timesteps, reverse=True)}


# -- drivers: run a model over prompts with a recorder attached ----------------------------------


def _block_name(module: nn.Module, block: str) -> str:
    """``block`` as a submodule name of ``module``: as given when it exists, else its diffusers spelling."""
    names = dict(module.named_modules())
    if block in names:
        return block
    try:
        from .blocks import canonical_name

        name = canonical_name(block)
    except Exception:  # noqa: BLE001 - an unknown spelling is reported below with the close names
        name = block
    if name in names:
        return name
    import difflib

    close = difflib.get_close_matches(block, [n for n in names if n], n=5)
    raise SAEConfigError(
        f"block {block!r}: {type(module).__name__} has no such submodule; close names: {close}. Use a name from "
        "`python -m sae_core blocks` or the model's named_modules()"
    )


def _prompt_batches(prompts: Sequence[str], batch: int) -> list[list[str]]:
    if not prompts:
        raise SAEConfigError("collect: no prompts given; pass at least one prompt (a file with one per line)")
    if batch < 1:
        raise SAEConfigError(f"collect: batch is {batch}, expected >= 1")
    return [list(prompts[i:i + batch]) for i in range(0, len(prompts), batch)]


class CollectResult(dict):
    """The manifest of the written dataset (a dict)."""


def collect_pipeline(pipe, prompts: Sequence[str], block: str, out: str | Path, settings: CollectSettings = CollectSettings(),
                     *, steps: int = 20, guidance: float = 7.5, height: int | None = None, width: int | None = None,
                     seed: int = 0, batch: int = 1, negative_prompt: str | None = None, model_id: str | None = None,
                     progress=None, overwrite: bool = False) -> CollectResult:
    """Run a diffusers text-to-image pipeline (``pipe.unet`` or ``pipe.transformer``) over ``prompts`` with an
    ActivationRecorder on ``block``; write the dataset to ``out``. Images are not decoded (output_type="latent").

    ``progress(done_batches, total_batches)`` is called after every batch.
    """
    from .dit_hooks import attach_dit_interventions, dit_family
    from .errors import SAELookupError
    from .torch_hooks import StepHolder, attach_interventions, track_timestep

    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        raise SAEConfigError(f"{model_id or type(pipe).__name__}: the pipeline has neither .unet nor .transformer to hook")
    name = _block_name(denoiser, block)
    pipe.scheduler.set_timesteps(steps)
    schedule = pipe.scheduler.timesteps.clone()
    try:  # FLUX / SD3 transformers: image tokens of the block's (text, image) output, see dit_hooks
        dit = dit_family(denoiser)
    except SAELookupError:
        dit = None
    # diffusers runs CFG as one batch [uncond; cond] when guidance_scale > 1 (FLUX's guidance is distilled: no CFG)
    chunks = (1, 0) if guidance > 1 and dit != "flux" else (0,)
    sampler = {"host": "diffusers", "pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
               "steps": steps, "guidance": guidance, "height": height, "width": width, "seed": seed, "batch": batch,
               "negative_prompt": negative_prompt}
    family = family_from_diffusers(dict(denoiser.config))  # None for denoisers without a block table
    meta = {"model": {"id": model_id, "fingerprint": model_fingerprint(denoiser), "class": type(denoiser).__name__,
                      "family": family},
            "block": name, "input_space": settings.input_space, "branches": settings.branches,
            "prompts": list(prompts), "sampler": sampler}
    writer = ShardWriter(out, settings.shard_rows, settings.dtype, meta, overwrite=overwrite)
    rec = ActivationRecorder(writer, settings, label=name)
    holder = StepHolder()
    batches = _prompt_batches(prompts, batch)
    device = getattr(pipe, "device", torch.device("cpu"))
    attach = attach_dit_interventions if dit else attach_interventions
    with track_timestep(denoiser, holder, chunks, schedule), attach(denoiser, {name: rec}, holder):
        for bi, ps in enumerate(batches):
            gen = torch.Generator(device=device).manual_seed(seed + bi)
            kwargs = {"prompt": ps, "num_inference_steps": steps, "guidance_scale": guidance, "generator": gen,
                      "output_type": "latent"}
            if height is not None:
                kwargs["height"] = height
            if width is not None:
                kwargs["width"] = width
            if negative_prompt is not None and guidance > 1 and dit != "flux":
                kwargs["negative_prompt"] = [negative_prompt] * len(ps)
            pipe(**kwargs)
            if progress is not None:
                progress(bi + 1, len(batches))
    return CollectResult(writer.close(recorder=rec.summary()))


def is_shapes_model(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return str(json.loads(cfg.read_text()).get("format", "")).startswith("shapes_world.model")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_pipeline(model: str, dtype: str = "float32", device: str = "cpu"):
    """A diffusers pipeline from a model id or a local folder (DiffusionPipeline.from_pretrained)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError as e:
        raise SAEConfigError("collect: diffusers is not installed; `pip install diffusers transformers`") from e
    local = Path(model).is_dir()
    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=DTYPES[dtype], local_files_only=local)
    except (OSError, ValueError, EnvironmentError) as e:
        what = "a local folder without a loadable pipeline (model_index.json)" if local else "a model id that could not be loaded"
        raise SAEFormatError(
            f"{model}: {what} ({' '.join(str(e).split())[:300]}); give a diffusers pipeline folder "
            "(save_pretrained) or a Hugging Face model id reachable from this machine"
        ) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
