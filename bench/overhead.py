"""Per-step UNet time and peak memory: unpatched vs detection only vs Patch Replacer (PER) vs SAE Steer.

SD 1.5 and SDXL architectures with random weights, the SAE on a 1280-channel block (SD1
up_blocks.1.attentions.1 = output_blocks.4.1, SDXL up_blocks.0.attentions.1 = output_blocks.1.1),
SAE sizes M = 5120 and 20480 (d = 1280, k = 32, ReLU-TopK as SAeUron), batch 1 (cond only) and a CFG pair.

Two host paths, same interventions (sae_core.intervention.BlockIntervention with a Recorder, as the nodes
build them):
  comfy     - a ComfyUI ModelPatcher clone carrying the nodes' object patch (nodes/hook.install_patch),
              applied with patch_model() around each timed call; the UNet is called with the
              transformer_options the sampler would give (sigmas, cond_or_uncond, sample_sigmas).
              Needs ComfyUI importable: run with the Python of a ComfyUI install and COMFYUI_PATH set
              to its checkout.
  diffusers - UNet2DConditionModel with sae_core.torch_hooks.attach_interventions.
--path auto takes comfy when ComfyUI imports, else diffusers.

Time: every configuration of one (arch, M, batch) group, the unpatched model included, runs once per
round, the order rotating each round (interleaved, so drift hits all alike); after warm-up rounds the
median over rounds is taken and each patched median is printed as a ratio to the unpatched one of the
same group. The spread column is the unpatched time's (max - min) / median over the rounds: ratio
differences below it are noise.

Peak memory (extra_peak_mb) = (rise of peak memory during one patched UNet call) - (the same for the
unpatched call) + bytes of the SAE weights held in the compute dtype on the device.
  GPU: torch.cuda.max_memory_allocated() - memory_allocated() before the call (peak stats reset).
  CPU: a proxy: the process's peak RSS rise (VmHWM after resetting it through /proc/self/clear_refs,
       minus VmRSS before the call) in separate memory rounds with glibc's mmap threshold set to 64 KiB
       (mallopt), so every tensor is its own mapping and freed ones leave RSS; medians over those rounds.
       Timed rounds run with a 32 MiB threshold and no trimming (a warm allocator, as CUDA's cache).
Growth: RSS (CPU) or memory_allocated (GPU) after N steps of the steered CFG model minus after step 1,
printed with the recorder's own record bytes (which legitimately grow by one mask per step).

Quick mode (CPU, a few minutes on 2 cores) scales down, and says so in its header: latent 16x16
(128x128 px; the hooked block's grid is 4x4 with its full 1280 channels, so SAE and UNet cost both
scale with the pixel count and the ratio stays meaningful, fixed per-call costs weigh more), SDXL's
10-deep transformers cut to depth 2 (a cheaper UNet: the SDXL ratios are pessimistic), fp32, fewer
rounds. Full mode: 512x512 (latent 64x64), the real depths, fp16, meant for --device cuda.

    COMFYUI_PATH=path/to/ComfyUI path/to/comfy-python bench/overhead.py --quick --json overhead.json
    python bench/overhead.py --quick --path diffusers
    python bench/overhead.py --device cuda            # full mode, GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time
from typing import Callable, NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    """glibc allocator thresholds (CPU memory proxy); False where not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(-3, mmap_threshold)) and bool(libc.mallopt(-1, trim_threshold))  # M_MMAP/M_TRIM
        libc.malloc_trim(0)  # drop what the heap kept under the previous setting: every config starts alike
        return ok
    except (OSError, AttributeError):
        return False


import torch  # noqa: E402

from sae_core.concepts import ConceptDictionary  # noqa: E402
from sae_core.config import SAEConfig  # noqa: E402
from sae_core.detect import ConceptDetector  # noqa: E402
from sae_core.intervention import BlockIntervention, Recorder, ReplaceSettings, StepInfo  # noqa: E402
from sae_core.sae import SparseAutoencoder  # noqa: E402
from sae_core.steer import SteerSettings  # noqa: E402

HOOKS = {"sd1": ("output_blocks.4.1", "up_blocks.1.attentions.1"),
         "sdxl": ("output_blocks.1.1", "up_blocks.0.attentions.1")}
METHODS = ("detect", "per", "steer")
WIDTH = 1280
K = 32


# ------------------------------------------------------------------------------------------------
# models


class Unet(NamedTuple):
    module: torch.nn.Module  # the module whose forward is one UNet step
    block: torch.nn.Module  # the hooked block (calibration only)
    run: Callable[[int], None]  # run(batch) -> one step, inputs prebuilt
    patched: Callable  # patched(intervention, chunks) -> context manager activating it
    path: str


def _fill(module: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights scaled like an initialised net (ComfyUI allocates them uninitialised)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(module.state_dict(keep_vars=True).items()):
            if not t.dtype.is_floating_point or "model_sampling" in name:
                continue
            src = torch.empty(t.shape, dtype=torch.float32)
            if t.ndim > 1:
                src.normal_(0.0, 0.7 / t[0].numel() ** 0.5, generator=g)
            elif name.endswith("weight"):
                src.normal_(1.0, 0.05, generator=g)
            else:
                src.normal_(0.0, 0.02, generator=g)
            t.copy_(src)


def comfy_config(arch: str, quick: bool) -> dict:
    deep = 2 if quick else 10
    if arch == "sd1":
        return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
                "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
                "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1] * 9 + [0] * 3,
                "use_temporal_attention": False, "use_temporal_resblock": False}
    return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
            "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, deep, deep],
            "channel_mult": [1, 2, 4], "transformer_depth_middle": deep, "use_linear_in_transformer": True,
            "context_dim": 2048, "num_head_channels": 64,
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, deep, deep, deep],
            "use_temporal_attention": False, "use_temporal_resblock": False}


def diffusers_config(arch: str, quick: bool) -> dict:
    if arch == "sd1":
        return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    deep = 2 if quick else 10
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                transformer_layers_per_block=(1, 2, deep), use_linear_projection=True,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)


class _Patched:
    def __init__(self, enter, exit_):
        self.enter, self.exit = enter, exit_

    def __enter__(self):
        self.enter()

    def __exit__(self, *exc):
        self.exit()


def build_comfy(arch: str, quick: bool, device: torch.device, dtype: torch.dtype, latent: int) -> Unet:
    import comfy.model_patcher  # noqa: TID251 (the bench drives ComfyUI itself)
    import comfy.patcher_extension  # noqa: TID251 (the bench drives ComfyUI itself)
    import comfy.supported_models as sm  # noqa: TID251 (the bench drives ComfyUI itself)

    from nodes.hook import RunState, install_patch

    mc = (sm.SD15 if arch == "sd1" else sm.SDXL)(comfy_config(arch, quick))
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({}, device=device)
    _fill(model, 1)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    ms = patcher.get_model_object("model_sampling")
    sigma = ms.sigma(torch.tensor(500.0)).to(device)
    sched = torch.cat([ms.sigma(torch.linspace(999, 0, 20)), torch.zeros(1)]).to(device)
    timestep = ms.timestep(sigma)
    key, _ = HOOKS[arch]
    unet = model.diffusion_model
    block = patcher.get_model_object("diffusion_model." + key)
    g = torch.Generator().manual_seed(3)
    inputs: dict[int, dict] = {}
    chunks_of = {1: [0], 2: [1, 0]}

    def make(batch: int) -> dict:
        if batch not in inputs:
            n_img = batch // len(chunks_of[batch])
            kw = {"x": torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype),
                  "timesteps": timestep.expand(batch).to(device),
                  "context": torch.randn(batch, 77, 768 if arch == "sd1" else 2048, generator=g).to(device, dtype),
                  "transformer_options": {"cond_or_uncond": chunks_of[batch], "sigmas": sigma.expand(n_img),
                                          "sample_sigmas": sched}}
            if arch == "sdxl":
                kw["y"] = torch.randn(batch, 2816, generator=g).to(device, dtype)
            inputs[batch] = kw
        return inputs[batch]

    def run(batch: int) -> None:
        kw = make(batch)
        # transformer_options is filled in place by the UNet: give each call a fresh one, as the sampler does
        unet(**{**kw, "transformer_options": dict(kw["transformer_options"])})

    def patched(intervention, chunks):
        state = RunState("bench", getattr(intervention, "recorder", None))
        clone = install_patch(patcher, "diffusion_model." + key, intervention, state,
                              comfy.patcher_extension.WrappersMP.OUTER_SAMPLE)

        def enter():
            clone.patch_model(load_weights=False)
            state.begin(ms)  # what the OUTER_SAMPLE wrapper does at the start of a run

        def exit_():
            state.end()
            clone.unpatch_model(unpatch_weights=False)

        return _Patched(enter, exit_)

    return Unet(unet, block, run, patched, "comfy (ModelPatcher + nodes/hook object patch)")


def build_diffusers(arch: str, quick: bool, device: torch.device, dtype: torch.dtype, latent: int) -> Unet:
    from diffusers import UNet2DConditionModel

    from sae_core.torch_hooks import StepHolder, attach_interventions

    unet = UNet2DConditionModel(**diffusers_config(arch, quick))
    _fill(unet, 1)
    unet = unet.to(device, dtype).eval()
    _, name = HOOKS[arch]
    block = dict(unet.named_modules())[name]
    g = torch.Generator().manual_seed(3)
    inputs: dict[int, dict] = {}

    def make(batch: int) -> dict:
        if batch not in inputs:
            kw = {"sample": torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype),
                  "timestep": torch.full((batch,), 500.0, device=device),
                  "encoder_hidden_states": torch.randn(batch, 77, 768 if arch == "sd1" else 2048,
                                                       generator=g).to(device, dtype)}
            if arch == "sdxl":
                kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=g).to(device, dtype),
                                           "time_ids": torch.randn(batch, 6, generator=g).to(device, dtype)}
            inputs[batch] = kw
        return inputs[batch]

    def run(batch: int) -> None:
        unet(**make(batch), return_dict=False)

    def patched(intervention, chunks):
        holder = StepHolder(StepInfo(500.0, None, tuple(chunks), 10))
        live = []

        def enter():  # a fresh context per activation: generator context managers enter once
            live.append(attach_interventions(unet, {name: intervention}, holder))
            live[-1].__enter__()

        return _Patched(enter, lambda: live.pop().__exit__(None, None, None))

    return Unet(unet, block, run, patched, "diffusers (UNet2DConditionModel + sae_core.torch_hooks)")


# ------------------------------------------------------------------------------------------------
# SAE and concept


def random_sae(M: int, seed: int) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(M, WIDTH, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    W_enc = W_dec + 0.1 * torch.randn(M, WIDTH, generator=g) / WIDTH ** 0.5
    cfg = SAEConfig(d_in=WIDTH, n_latents=M, k=K, activation="relu_topk")
    return SparseAutoencoder(cfg, W_enc=W_enc, b_enc=-0.01 * torch.rand(M, generator=g), W_dec=W_dec,
                             b_dec=torch.zeros(WIDTH), source=f"<random M={M}>")


def calibrate(sae: SparseAutoencoder, block_out: torch.Tensor, fraction: float = 0.25) -> ConceptDictionary:
    """A one-latent concept on the most often active latent, threshold so that ~``fraction`` of patches fire."""
    tokens = block_out.float().permute(0, 2, 3, 1).reshape(-1, WIDTH)
    codes = sae.float().encode(tokens)
    lat = int((codes > 0).sum(0).argmax())
    vals = codes[:, lat]
    thr = float(torch.quantile(vals, 1.0 - fraction))
    return ConceptDictionary.from_latents([lat], M := sae.cfg.n_latents, threshold=thr, means=[0.5],
                                          name=f"latent{lat}of{M}")


def capture_block(unet: Unet) -> torch.Tensor:
    """The hooked block's output on a CFG-pair call, through a temporary torch hook (calibration only)."""
    captured = []
    h = unet.block.register_forward_hook(lambda m, a, o: captured.append(o if torch.is_tensor(o) else o[0]))
    try:
        with torch.inference_mode():
            unet.run(2)
    finally:
        h.remove()
    return captured[0].detach().clone()


def weight_bytes(sae: SparseAutoencoder, device: torch.device, dtype: torch.dtype) -> int:
    w = sae.weights(device, dtype)
    return sum(t.numel() * t.element_size() for t in w if t is not None)


# ------------------------------------------------------------------------------------------------
# measurement


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        s = f.read()
    return {k: int(re.search(k + r":\s+(\d+)", s).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


class Meter:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> int:
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return _status()["VmRSS"]

    def peak(self, base: int) -> int:
        self.sync()
        if self.cuda:
            return torch.cuda.max_memory_allocated() - base
        return _status()["VmHWM"] - base

    def resident(self) -> int:
        self.sync()
        return torch.cuda.memory_allocated() if self.cuda else _status()["VmRSS"]

    @property
    def what(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated rise per call"
        return "CPU proxy: peak-RSS rise per call (VmHWM after /proc/self/clear_refs, glibc mmap threshold 64 KiB)"


class Result(NamedTuple):
    times: list[float]
    peaks: list[int]
    hook: list[float]


def measure_group(unet: Unet, batch: int, configs: dict, meter: Meter, warmup: int, rounds: int,
                  mem_rounds: int) -> dict[str, Result]:
    """Interleaved: each round runs every config once, order rotated per round; then the memory rounds."""
    names = list(configs)
    out = {n: Result([], [], []) for n in names}

    def one(n: str, timed: bool) -> None:
        ctx = configs[n]
        if ctx is not None:
            ctx.timed.seconds = 0.0
            ctx.__enter__()
        try:
            base = meter.start() if not timed else 0
            t0 = time.perf_counter()
            unet.run(batch)
            meter.sync()
            dt = time.perf_counter() - t0
            pk = meter.peak(base) if not timed else 0
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
                ctx.recorder.reset()
        if timed:
            out[n].times.append(dt)
            out[n].hook.append(0.0 if ctx is None else ctx.timed.seconds)
        else:
            out[n].peaks.append(pk)

    with torch.inference_mode():
        if not meter.cuda:
            _mallopt(32 << 20, 512 << 20)
        for r in range(warmup + rounds):
            shift = r % len(names)
            for n in names[shift:] + names[:shift]:
                one(n, timed=True)
            if r < warmup:
                for n in names:
                    out[n].times.clear()
                    out[n].hook.clear()
        if not meter.cuda:
            _mallopt(64 << 10, 0)
        one(names[0], timed=True)  # unrecorded: settles the allocator after the switch
        out[names[0]].times.pop()
        out[names[0]].hook.pop()
        for r in range(mem_rounds):
            shift = r % len(names)
            for n in names[shift:] + names[:shift]:
                one(n, timed=False)
        if not meter.cuda:
            _mallopt(32 << 20, 512 << 20)
    return out


class Timed:
    """Wraps an intervention and sums the wall time spent inside it (CPU: its whole cost; GPU: launch time plus
    any host synchronisation, which is what should stay near zero there)."""

    def __init__(self, iv: BlockIntervention):
        self.iv, self.recorder, self.seconds, self.calls = iv, iv.recorder, 0.0, 0

    def __call__(self, block_in, block_out, step):
        t0 = time.perf_counter()
        y = self.iv(block_in, block_out, step)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return y


class Cfg(_Patched):
    """An activation context for one patched configuration, carrying its recorder for resets."""

    def __init__(self, ctx, timed: Timed):
        super().__init__(ctx.__enter__, lambda: ctx.__exit__(None, None, None))
        self.timed, self.recorder = timed, timed.recorder


def make_intervention(sae, det, method: str, label: str) -> BlockIntervention:
    edit = {"detect": None, "per": ReplaceSettings("random", seed=0),
            "steer": SteerSettings("saeuron_scale", strength=-5.0)}[method]
    return BlockIntervention(sae, det, edit, branches="both", recorder=Recorder(), label=label)


def growth_check(unet: Unet, sae, det, meter: Meter, steps: int, label: str) -> str:
    iv = make_intervention(sae, det, "steer", label)
    ctx = unet.patched(iv, (1, 0))
    if not meter.cuda:
        _mallopt(64 << 10, 0)  # RSS then follows live tensors, not what the heap keeps for reuse
    with torch.inference_mode():
        ctx.__enter__()
        try:
            unet.run(2)
            gc.collect()
            first = meter.resident()
            for _ in range(steps - 1):
                unet.run(2)
            gc.collect()
            last = meter.resident()
        finally:
            ctx.__exit__(None, None, None)
    rec_bytes = sum(r.bits.numel() + (0 if r.score is None else r.score.numel() * 2) for r in iv.recorder.records)
    n = len(iv.recorder.records)
    iv.recorder.reset()
    return (f"growth over {steps} steps (steer, CFG pair): {(last - first) / 2**20:+.1f} MB "
            f"({'RSS' if not meter.cuda else 'memory_allocated'}; recorder holds {n} records, {rec_bytes} bytes)")


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (see the module docstring)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    ap.add_argument("--path", choices=("auto", "comfy", "diffusers"), default="auto")
    ap.add_argument("--arch", default="sd1,sdxl")
    ap.add_argument("--latents", default="5120,20480", help="SAE sizes M")
    ap.add_argument("--batches", default="1,2", help="rows per UNet call: 1 = cond only, 2 = a CFG pair")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--mem-rounds", type=int, default=None)
    ap.add_argument("--growth-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write {arch/M/method/batch: {time_ratio, extra_peak_mb}}")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    size = args.size or (128 if args.quick else 512)
    latent = size // 8
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 20)
    mem_rounds = args.mem_rounds if args.mem_rounds is not None else (1 if args.quick else 3)
    growth = args.growth_steps if args.growth_steps is not None else (10 if args.quick else 100)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    path = args.path
    if path in ("auto", "comfy"):
        try:
            comfy_root = os.environ.get("COMFYUI_PATH")
            if comfy_root:  # appended: ComfyUI's top-level nodes.py must not shadow the pack's nodes/
                sys.path.append(comfy_root)
            from comfy.cli_args import args as comfy_args  # noqa: TID251

            if device.type == "cpu":
                comfy_args.cpu = True
            comfy_args.use_pytorch_cross_attention = True
            import comfy.model_management  # noqa: F401, TID251

            path = "comfy"
        except ImportError:
            if path == "comfy":
                raise
            path = "diffusers"
    build = build_comfy if path == "comfy" else build_diffusers
    meter = Meter(device)
    methods = args.methods.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, dict] = {}

    print(f"SAE overhead per UNet step -- {'quick' if args.quick else 'full'} mode, {device} {str(dtype)[6:]}, "
          f"{args.threads} thread(s), {size}x{size} px (latent {latent}x{latent}), torch {torch.__version__}")
    if args.quick:
        print("quick mode scales: small latent (hooked block keeps 1280 channels, grid latent/4), SDXL transformer "
              "depth 10 -> 2 (cheaper UNet, pessimistic SDXL ratios), fp32, few rounds")
    print(f"rounds: {warmup} warm-up + {rounds} timed, interleaved; SAE ReLU-TopK k={K}, d={WIDTH}; "
          f"memory: {meter.what}")
    print("time_ratio = median patched / median unpatched of the same group; min = ratio of the minima; "
          "spread = unpatched (max-min)/median")
    print("hook = median wall time inside the intervention / median unpatched step (CPU: a low-noise estimate of "
          "ratio - 1; GPU: launch + host-sync time only)")
    print("extra_peak_mb = patched peak rise - unpatched peak rise + SAE weights in the compute dtype")
    print()
    hdr = f"{'arch':5s} {'M':>6s} {'method':7s} {'batch':>5s} {'ms':>9s} {'ratio':>7s} {'min':>7s} " \
          f"{'spread':>7s} {'extra MB':>9s} {'(weights)':>9s} {'hook':>7s}"
    for arch in args.arch.split(","):
        t0 = time.perf_counter()
        unet = build(arch, args.quick, device, dtype, latent)
        print(f"[{arch}] path: {unet.path}; hooked {HOOKS[arch][0]} = {HOOKS[arch][1]}; "
              f"{sum(p.numel() for p in unet.module.parameters()) / 1e6:.0f} M params; built in "
              f"{time.perf_counter() - t0:.0f} s")
        block_out = capture_block(unet)
        print(f"[{arch}] hooked block output {tuple(block_out.shape)}")
        print(hdr)
        last_pair = None
        for M in (int(m) for m in args.latents.split(",")):
            sae = random_sae(M, seed=M)
            concept = calibrate(sae, block_out)
            sae = sae.to(device)  # master weights where the hook runs; casts are cached per dtype
            det = ConceptDetector(concept)
            wb = weight_bytes(sae, device, dtype)
            for batch in batches:
                chunks = (0,) if batch == 1 else (1, 0)
                configs: dict = {"unpatched": None}
                for meth in methods:
                    iv = Timed(make_intervention(sae, det, meth, HOOKS[arch][0]))
                    configs[meth] = Cfg(unet.patched(iv, chunks), iv)
                res = measure_group(unet, batch, configs, meter, warmup, rounds, mem_rounds)
                base_t = statistics.median(res["unpatched"].times)
                base_min = min(res["unpatched"].times)
                spread = (max(res["unpatched"].times) - base_min) / base_t
                base_pk = statistics.median(res["unpatched"].peaks)
                print(f"{arch:5s} {M:6d} {'none':7s} {batch:5d} {1000 * base_t:9.1f} {1.0:7.3f} {1.0:7.3f} "
                      f"{spread:7.3f} {0.0:9.1f} {'':>9s} {'':>7s}")
                for meth in methods:
                    r = res[meth]
                    ratio = statistics.median(r.times) / base_t
                    rmin = min(r.times) / base_min
                    extra = (statistics.median(r.peaks) - base_pk + wb) / 2**20
                    hook = statistics.median(r.hook) / base_t
                    results[f"{arch}/{M}/{meth}/{batch}"] = {
                        "time_ratio": round(ratio, 4), "extra_peak_mb": round(extra, 1),
                        "time_ratio_min": round(rmin, 4), "unpatched_ms": round(1000 * base_t, 2),
                        "unpatched_spread": round(spread, 4), "hook_share": round(hook, 4)}
                    print(f"{arch:5s} {M:6d} {meth:7s} {batch:5d} {1000 * statistics.median(r.times):9.1f} "
                          f"{ratio:7.3f} {rmin:7.3f} {'':7s} {extra:9.1f} {wb / 2**20:9.1f} {100 * hook:6.2f}%")
            last_pair = (sae, det)
            del configs, res
            gc.collect()
        if growth > 1 and last_pair is not None:
            print(f"[{arch}] " + growth_check(unet, *last_pair, meter, growth, HOOKS[arch][0]))
        print()
        del unet, block_out, last_pair
        gc.collect()

    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True))
        print(f"wrote {args.json} ({len(results)} entries)")
    if not math.isfinite(sum(v["time_ratio"] for v in results.values())):
        print("warning: non-finite ratios")


if __name__ == "__main__":
    main()
