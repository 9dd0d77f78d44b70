"""Activation collection: a recording block intervention writing sharded safetensors files and a manifest.

A dataset folder holds ``shard_00000.safetensors``, ``shard_00001.safetensors``, ... (tensor ``acts`` [rows, d]
plus the float64 per-channel ``sum`` and ``sumsq`` of the shard, so a trainer gets exact statistics without
reading the rows) and ``manifest.json`` (what was recorded: model fingerprint, block, input space, branches,
prompts, sampler settings, counts). Memory is bounded by one shard buffer (``shard_rows`` x d) plus the rows
of one block call. Every file is written to a temporary name and renamed, so a folder never holds a
half-written shard; the manifest is rewritten after every shard (``complete`` false until ``close``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import SAEConfigError, SAEFormatError
from .intervention import BRANCHES, StepInfo, chunk_rows

logger = logging.getLogger(__name__)

FORMAT = "sae-concept-eraser/activations"
VERSION = 1
MANIFEST = "manifest.json"
_MOMENT_CHUNK = 8192
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def write_json_atomic(path: Path, data: Mapping) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


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
        if self.dtype not in _DTYPES:
            raise SAEConfigError(f"CollectSettings.dtype: expected one of {list(_DTYPES)}, found {self.dtype!r}")
        if self.step_indices is not None:
            object.__setattr__(self, "step_indices", tuple(sorted({int(s) for s in self.step_indices})))


class ShardWriter:
    """Buffers rows [n, d] and writes a shard whenever ``shard_rows`` are full; ``close`` writes the rest."""

    def __init__(self, folder: str | Path, shard_rows: int, dtype: str = "float16", meta: Mapping[str, Any] | None = None,
                 overwrite: bool = False):
        self.folder = Path(folder)
        if (self.folder / MANIFEST).exists() and not overwrite:
            raise SAEFormatError(
                f"{self.folder}: already holds a dataset ({MANIFEST}); choose a new folder or allow overwriting"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("shard_*.safetensors"):
            old.unlink()
        self.shard_rows, self.dtype = int(shard_rows), _DTYPES[dtype]
        self.meta = dict(meta or {})
        self.d: int | None = None
        self.buf: Tensor | None = None
        self.fill = 0
        self.shards: list[dict[str, Any]] = []
        self.rows = 0
        self.started = time.time()

    def add(self, rows: Tensor) -> None:
        rows = rows.detach()
        if rows.ndim != 2:
            raise ValueError(f"ShardWriter.add: expected rows [n, d], found shape {tuple(rows.shape)}")
        if self.d is None:
            self.d = int(rows.shape[1])
            self.buf = torch.empty(self.shard_rows, self.d, dtype=self.dtype)
        elif rows.shape[1] != self.d:
            raise ValueError(f"ShardWriter.add: rows have {rows.shape[1]} channels, earlier rows had {self.d}")
        i = 0
        while i < rows.shape[0]:
            take = min(self.shard_rows - self.fill, rows.shape[0] - i)
            self.buf[self.fill:self.fill + take].copy_(rows[i:i + take])
            self.fill += take
            i += take
            if self.fill == self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        if not self.fill:
            return
        acts = self.buf[: self.fill]  # a contiguous view: no copy of the shard
        total = torch.zeros(self.d, dtype=torch.float64)
        total_sq = torch.zeros(self.d, dtype=torch.float64)
        for i in range(0, self.fill, _MOMENT_CHUNK):  # float64 moments in chunks, never a float64 copy of the shard
            x = acts[i:i + _MOMENT_CHUNK].double()
            total += x.sum(0)
            total_sq += x.pow(2).sum(0)
        tensors = {"acts": acts, "sum": total, "sumsq": total_sq}
        name = shard_name(len(self.shards))
        tmp = self.folder / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT + "/shard"})
        os.replace(tmp, self.folder / name)
        self.shards.append({"file": name, "rows": self.fill})
        self.rows += self.fill
        self.fill = 0
        self.write_manifest(complete=False)
        logger.info("wrote %s (%d rows, %d in all)", name, self.shards[-1]["rows"], self.rows)

    def manifest(self, complete: bool) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": VERSION, "complete": complete, "d_in": self.d,
                "dtype": str(self.dtype).removeprefix("torch."), "rows": self.rows, "shard_rows": self.shard_rows,
                "shards": list(self.shards), "seconds": round(time.time() - self.started, 3), **self.meta}

    def write_manifest(self, complete: bool) -> None:
        write_json_atomic(self.folder / MANIFEST, self.manifest(complete))

    def close(self, **meta: Any) -> dict[str, Any]:
        """Write the last partial shard and the final manifest (``meta`` merged in); returns the manifest."""
        self.meta.update(meta)
        self._flush()
        if not self.shards:
            raise SAEFormatError(f"{self.folder}: nothing was recorded; was the block run with the collector attached?")
        self.write_manifest(complete=True)
        return self.manifest(True)


class ActivationRecorder:
    """A BlockIntervention that records and changes nothing: (block_in, block_out, step) -> block_out.

    Keeps the rows of the chosen CFG branches at the chosen steps, optionally a random subset of patch positions
    per map, as channels-last vectors [n, d] (``b c h w`` feature maps or ``b n c`` token sequences), and hands
    them to ``writer``. Usable on both hosts: ``sae_core.torch_hooks.attach_interventions`` and the ComfyUI hook.
    """

    def __init__(self, writer: ShardWriter, settings: CollectSettings = CollectSettings(), label: str = "block"):
        self.writer, self.settings, self.label = writer, settings, label
        self.branches = BRANCHES[settings.branches]
        self.gen = torch.Generator().manual_seed(int(settings.seed))
        self.calls = 0
        self.grid: tuple[int, ...] | None = None
        self.timesteps: set[float] = set()

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model_options on clone; the recorder must stay one object
        return self

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


# -- reading -------------------------------------------------------------------------------------


@dataclass
class ActivationDataset:
    """A dataset folder, validated: its manifest and shard list (rows per shard)."""

    folder: Path
    manifest: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, folder: str | Path) -> ActivationDataset:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise SAEFormatError(
                f"{folder}: no {MANIFEST}; expected a folder written by `python -m sae_core collect` (or the "
                "Collect Activations node)"
            )
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SAEFormatError(f"{path}: not readable JSON ({e}); collect the activations again") from e
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            found = m.get("format") if isinstance(m, dict) else type(m).__name__
            raise SAEFormatError(f"{path}: format is {found!r}, expected {FORMAT!r}")
        if int(m.get("format_version", 0)) > VERSION:
            raise SAEFormatError(f"{path}: format_version {m['format_version']} is newer than this pack reads ({VERSION}); update the pack")
        shards = m.get("shards") or []
        if not shards or not isinstance(m.get("d_in"), int):
            raise SAEFormatError(f"{path}: holds no shards (rows {m.get('rows')}); the collection recorded nothing")
        for s in shards:
            if not (folder / s["file"]).is_file():
                raise SAEFormatError(f"{folder / s['file']}: listed in {MANIFEST} but missing; copy the whole folder")
        if not m.get("complete", False):
            logger.warning("%s: the collection did not finish; using the %d shards written", folder, len(shards))
        return cls(folder, m, list(shards))

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    def rows(self, i: int) -> int:
        return int(self.shards[i]["rows"])

    def _open(self, i: int):
        path = self.folder / self.shards[i]["file"]
        try:
            return path, safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise SAEFormatError(f"{path}: not a readable safetensors shard ({e}); collect the activations again") from e

    def load(self, i: int) -> Tensor:
        """Shard ``i``'s rows [rows, d] as stored (float16 by default)."""
        path, f = self._open(i)
        with f:
            if "acts" not in f.keys():
                raise SAEFormatError(f"{path}: no tensor 'acts' (found {sorted(f.keys())})")
            acts = f.get_tensor("acts")
        if acts.ndim != 2 or acts.shape != (self.rows(i), self.d_in):
            raise SAEFormatError(
                f"{path}: 'acts' has shape {tuple(acts.shape)}, expected ({self.rows(i)}, {self.d_in}) per {MANIFEST}"
            )
        return acts

    def moments(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, int]:
        """(mean [d], total variance per row, rows) over the shards ``indices``, in float64, from the stored sums."""
        s = torch.zeros(self.d_in, dtype=torch.float64)
        sq = torch.zeros_like(s)
        n = 0
        for i in indices:
            path, f = self._open(i)
            with f:
                s += f.get_tensor("sum")
                sq += f.get_tensor("sumsq")
            n += self.rows(i)
        mean = s / n
        total_var = float((sq / n - mean.pow(2)).sum())
        return mean, total_var, n


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
    try:
        from .blocks import family_from_unet_config

        family = family_from_unet_config(dict(denoiser.config))
    except Exception:  # noqa: BLE001 - transformers and unknown configs: no family
        family = dit
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
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=_DTYPES[dtype], local_files_only=local)
    except (OSError, ValueError, EnvironmentError) as e:
        what = "a local folder without a loadable pipeline (model_index.json)" if local else "a model id that could not be loaded"
        raise SAEFormatError(
            f"{model}: {what} ({' '.join(str(e).split())[:300]}); give a diffusers pipeline folder "
            "(save_pretrained) or a Hugging Face model id reachable from this machine"
        ) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
