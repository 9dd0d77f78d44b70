"""What does the DiT adapter (nodes/dit_hook.py) add to one BlockIntervention call on a FLUX block?

Same run, same tokens: the intervention called directly on the image tokens as a [B, C, H, W] map (the
baseline), then through the ComfyUI ``patches_replace["dit"]`` patch on a double block (image stream only)
and on a single block (text tokens first: the edited tokens are put back with a concatenation), for PER
output and PER residual (which keeps a copy of the block input's image tokens). The block itself is a stub
returning precomputed tokens, so only the adapter is measured. Default size: FLUX at 512 px (32 x 32 tokens,
3072 channels, 512 text tokens), Krea's SAE width (M = 12288, k = 64), one image (cfg 1).

    python bench/dit_hook_overhead.py [--grid 32x32] [--txt 512] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
from einops import rearrange

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from nodes.dit_hook import GRID_KEY, make_dit_patch  # noqa: E402
from nodes.hook import RunState  # noqa: E402
from sae_core.concepts import ConceptDictionary  # noqa: E402
from sae_core.detect import ConceptDetector  # noqa: E402
from sae_core.intervention import BlockIntervention, ReplaceSettings, StepInfo  # noqa: E402
from sae_core.synthetic import coverage_regions, planted_maps, planted_sae  # noqa: E402


class Sampling:
    """model_sampling as FLUX has it: the model timestep is the sigma."""

    def timestep(self, sigma):
        return sigma


def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="32x32")
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--latents", type=int, default=12288)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    H, W = (int(v) for v in args.grid.lower().split("x"))
    sae, u = planted_sae(d=args.width, M=args.latents, activation="relu_topk", k=args.k)
    pm = planted_maps(1, H, W, u, region=coverage_regions(1, H, W, 0.25))
    out_map = pm.block_out
    in_map = out_map - 0.1 * torch.randn_like(out_map)
    img_out = rearrange(out_map, "b c h w -> b (h w) c").contiguous()
    img_in = rearrange(in_map, "b c h w -> b (h w) c").contiguous()
    txt = torch.randn(1, args.txt, args.width)
    det = ConceptDetector(ConceptDictionary.from_latents([0], args.latents, threshold=1.0, means=[0.5]))
    step = StepInfo(0.5, sigma=0.5, chunks=(0,), step_index=None)
    to = {"sigmas": torch.tensor([0.5]), "cond_or_uncond": [0], GRID_KEY: (2 * H, 2 * W, args.txt)}
    single_in, single_out = torch.cat([txt, img_in], 1), torch.cat([txt, img_out], 1)

    def through(kind, iv):
        state = RunState("bench")
        state.begin(Sampling())
        patch = make_dit_patch(kind, None, iv, state, None, 2)
        if kind == "double_block":
            args_, res = {"img": img_in, "txt": txt, "transformer_options": to}, {"img": img_out, "txt": txt}
        else:
            args_, res = {"img": single_in, "transformer_options": to}, {"img": single_out}
        return lambda: patch(args_, {"original_block": lambda a: dict(res)})

    print(f"FLUX block: {H}x{W} image tokens, {args.txt} text tokens, {args.width} ch, M={args.latents}, "
          f"k={args.k}, cpu float32, {args.threads} thread(s)")
    print(f"{'case':34s} {'ms/call':>10s} {'x direct':>9s}")
    with torch.no_grad():
        for label, target in (("PER output", "output"), ("PER residual", "residual")):
            iv = BlockIntervention(sae, det, ReplaceSettings("random", target=target))
            direct = timed(lambda iv=iv: iv(in_map, out_map, step), args.reps)
            print(f"{label + ', direct on the map':34s} {1000 * direct:10.2f} {1.0:9.2f}")
            for kind in ("double_block", "single_block"):
                t = timed(through(kind, iv), args.reps)
                print(f"{label + ', ' + kind + ' patch':34s} {1000 * t:10.2f} {t / direct:9.2f}")


if __name__ == "__main__":
    main()
