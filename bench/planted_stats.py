"""How far do PER and SAeUron steering (gamma = -10) move activations, on the planted-concept set?

The planted set (tests/planted.py): feature maps with a known unit direction u added (amplitude 2..3)
in known regions, and a real SparseAutoencoder whose latent 0 is u. The concept dictionary is learned
the real way (ConceptStatsAccumulator on planted vs clean maps, SAeUron score, top-1 latent). Every
edit runs through BlockIntervention on a CFG batch [uncond, cond].

Distances (sae_core.stats): W1 between token-norm distributions and the diagonal Frechet distance of
channel moments, each against (a) the unedited maps and (b) concept-free maps of the same background
statistics. Lower = closer to the model's own activation distribution.

    python bench/planted_stats.py [--grid 16x16] [--images 8] [--width 64] [--latents 256]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from einops import rearrange

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sae_core.concept_stats import ConceptStatsAccumulator  # noqa: E402
from sae_core.detect import ConceptDetector  # noqa: E402
from sae_core.intervention import BlockIntervention, ReplaceSettings, StepInfo  # noqa: E402
from sae_core.selection import SelectionRule, build_concept_dictionary  # noqa: E402
from sae_core.stats import activation_shift  # noqa: E402
from sae_core.steer import SteerSettings  # noqa: E402
from sae_core.synthetic import coverage_regions, planted_maps, planted_sae  # noqa: E402


def run(sae, u, H: int, W: int, B: int, coverage: float, gamma: float) -> dict:
    def planted(n, seed):
        return planted_maps(n, H, W, u, seed=seed, region=coverage_regions(n, H, W, coverage, seed=seed))

    def clean(n, seed):
        return planted_maps(n, H, W, u, seed=seed, region=torch.zeros(n, H, W, dtype=torch.bool))

    acc = ConceptStatsAccumulator(sae.cfg.n_latents)
    for t in (999.0, 500.0, 1.0):
        acc.add("concept", t, sae.encode(rearrange(planted(B, 11).block_out, "b c h w -> b h w c")))
        acc.add("clean", t, sae.encode(rearrange(clean(B, 12).block_out, "b c h w -> b h w c")))
    concept = build_concept_dictionary(acc.stats(), SelectionRule("top_n", top_n=1), keep=["concept"],
                                       sae_fingerprint=sae.fingerprint())
    det = ConceptDetector(concept, sae=sae)
    pm = planted(2 * B, 0)
    free = clean(2 * B, 1).block_out
    step = StepInfo(500.0, chunks=(1, 0), step_index=0)
    edits = {
        "unedited": pm.block_out,
        "PER random": BlockIntervention(sae, det, ReplaceSettings("random", seed=0))(None, pm.block_out, step),
        "PER nearest": BlockIntervention(sae, det, ReplaceSettings("nearest"))(None, pm.block_out, step),
        "PER mean": BlockIntervention(sae, det, ReplaceSettings("mean"))(None, pm.block_out, step),
        f"steer gamma={gamma:g} preserve": BlockIntervention(
            sae, det, SteerSettings("saeuron_scale", gamma))(None, pm.block_out, step),
        f"steer gamma={gamma:g} legacy": BlockIntervention(
            sae, det, SteerSettings("saeuron_scale", gamma, error="legacy_saeuron"))(None, pm.block_out, step),
    }
    st = concept.at(500.0)
    print(f"\nplanted set: {2 * B} maps {H}x{W}, concept on {100 * float(pm.region.float().mean()):.1f}% of patches, "
          f"selected latent {st.latents.tolist()}, mu_c={float(st.means[0]):.3f} (gamma*mu = {gamma * float(st.means[0]):.2f})")
    print(f"{'edit':30s} {'normW1/unedited':>16s} {'Frechet/unedited':>17s} {'normW1/clean':>13s} "
          f"{'Frechet/clean':>14s} {'mean-norm ratio':>16s}")
    rows = {}
    for name, y in edits.items():
        a, b = activation_shift(y, pm.block_out), activation_shift(y, free)
        rows[name] = (a, b)
        print(f"{name:30s} {a.norm_w1:16.4f} {a.channel_frechet:17.4f} {b.norm_w1:13.4f} {b.channel_frechet:14.4f} "
              f"{a.norm_mean_ratio:16.3f}")
    s, p = rows[f"steer gamma={gamma:g} preserve"][0].norm_w1, rows["PER random"][0].norm_w1
    print(f"token-norm W1 vs unedited maps: steering (gamma={gamma:g}) {s:.4f}, PER {p:.4f}, "
          f"ratio steering/PER = {s / max(p, 1e-12):.2f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="16x12", help="HxW of the feature map")
    ap.add_argument("--images", type=int, default=8, help="images per CFG branch")
    ap.add_argument("--width", type=int, default=64, help="channels d")
    ap.add_argument("--latents", type=int, default=256, help="SAE latents M")
    ap.add_argument("--gamma", type=float, default=-10.0)
    ap.add_argument("--coverage", type=float, nargs="+", default=[0.3, 0.1],
                    help="fractions of each map covered by the planted object (one table each)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    H, W = (int(v) for v in args.grid.lower().split("x"))
    sae, u = planted_sae(d=args.width, M=args.latents)
    for c in args.coverage:
        run(sae, u, H, W, args.images, c, args.gamma)


if __name__ == "__main__":
    main()
