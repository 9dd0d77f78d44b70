"""Proof on the shapes world: an SAE rebuilt with `python -m shapes_world.collect` and `sae_core train` against the shipped one.

    python -m shapes_world.scenes --n 768 --seed 30000001 > prompts.txt
    python -m shapes_world.collect --model shapes_world/weights --block up_blocks.1.attentions.1 --prompts prompts.txt \
        --out shapes_acts --steps 20 --guidance 3 --batch 32
    python -m sae_core train shapes_acts --out rebuilt/sae.safetensors --latents 1024 --k 4 --steps 3000 \
        --batch-size 2048
    python bench/shapes_rebuild.py --sae rebuilt/sae.safetensors --dataset shapes_acts --json rebuild.json

1. FVU of both SAEs on the same rows: the dataset's held-out shard(s), which the rebuilt SAE never trained on.
2. Concepts for the rebuilt SAE, learned exactly as the shipped ones (``shapes_world.learn.learn_concepts``, the
   same 384 captions and selection rule), written beside it under concepts/.
3. Detection IoU of every concept for both (``shapes_world.erasure.evaluate_concept``: the raw detection mask over
   every step against the evaluator's pixels of the concept, the same prompt sets as bench/erasure.py).
Prints both, their ratio / difference and whether they meet the targets (FVU within 10 %, IoU within 0.05).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_core.dataset import ActivationDataset  # noqa: E402
from sae_core.formats import load_sae  # noqa: E402
from sae_core.trainer import evaluate_rows  # noqa: E402
from shapes_world.erasure import WEIGHTS, evaluate_concept, load_world, prompt_sets  # noqa: E402
from shapes_world.learn import CONCEPT_DIR, CONCEPTS, SAE_NAME, LearnSettings, learn_concepts  # noqa: E402
from shapes_world.scenes import generate_scenes  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", type=Path, required=True, help="the rebuilt SAE (native .safetensors)")
    p.add_argument("--dataset", type=Path, required=True, help="the dataset folder it was trained on")
    p.add_argument("--holdout-shards", type=int, default=1, help="as given to train")
    p.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    p.add_argument("--targets", type=int, default=16, help="prompts naming the concept, per concept (IoU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    t0 = time.time()

    ds = ActivationDataset.open(a.dataset)
    hold = list(range(len(ds.shards) - a.holdout_shards, len(ds.shards)))
    shipped_sae = load_sae(WEIGHTS / SAE_NAME)
    rebuilt_sae = load_sae(a.sae)
    fvu = {"shipped": evaluate_rows(shipped_sae, (ds.load(i) for i in hold)),
           "rebuilt": evaluate_rows(rebuilt_sae, (ds.load(i) for i in hold))}
    print(f"[{time.time() - t0:5.0f} s] held-out FVU: shipped {fvu['shipped']['fvu']:.4f}, "
          f"rebuilt {fvu['rebuilt']['fvu']:.4f} ({fvu['shipped']['rows']} rows)", flush=True)

    # concepts for the rebuilt SAE, learned as shapes_world.learn.build learns the shipped ones
    world_dir = a.sae.parent
    if a.sae.name != SAE_NAME:
        shutil.copyfile(a.sae, world_dir / SAE_NAME)
    s = LearnSettings()
    shipped_world = load_world(WEIGHTS, a.concepts)
    caps = generate_scenes(s.concept_captions, seed=s.concept_caption_seed).captions
    dicts = learn_concepts(shipped_world.model, rebuilt_sae, caps, s.block, concepts=tuple(a.concepts))
    (world_dir / CONCEPT_DIR).mkdir(exist_ok=True)
    for name, d in dicts.items():
        d.save(world_dir / CONCEPT_DIR / f"{name}.safetensors")
    print(f"[{time.time() - t0:5.0f} s] learned {len(dicts)} concepts into {world_dir / CONCEPT_DIR}", flush=True)
    rebuilt_world = load_world(world_dir, a.concepts)

    iou = {}
    for c in a.concepts:
        tc, _ = prompt_sets(c, a.targets, 0)
        r_ship, _ = evaluate_concept(shipped_world, c, tc, [], {})
        r_new, _ = evaluate_concept(rebuilt_world, c, tc, [], {})
        iou[c] = {"shipped": r_ship.detection_iou, "rebuilt": r_new.detection_iou}
        print(f"[{time.time() - t0:5.0f} s] {c}: detection IoU shipped {r_ship.detection_iou:.3f}, "
              f"rebuilt {r_new.detection_iou:.3f}", flush=True)

    mean_ship = sum(v["shipped"] for v in iou.values()) / len(iou)
    mean_new = sum(v["rebuilt"] for v in iou.values()) / len(iou)
    fvu_ratio = fvu["rebuilt"]["fvu"] / fvu["shipped"]["fvu"]
    worst = max(abs(v["rebuilt"] - v["shipped"]) for v in iou.values())
    summary = {"fvu": fvu, "fvu_ratio": fvu_ratio, "iou": iou, "iou_mean": {"shipped": mean_ship, "rebuilt": mean_new},
               "iou_mean_diff": mean_new - mean_ship, "iou_worst_abs_diff": worst,
               "fvu_within_10pct": abs(fvu_ratio - 1) <= 0.10, "iou_mean_within_005": abs(mean_new - mean_ship) <= 0.05,
               "seconds": time.time() - t0}
    print(f"\n{'':18s} {'shipped':>8s} {'rebuilt':>8s} {'ratio/diff':>10s}")
    print(f"{'held-out FVU':18s} {fvu['shipped']['fvu']:8.4f} {fvu['rebuilt']['fvu']:8.4f} {fvu_ratio:10.3f}")
    print(f"{'mean detection IoU':18s} {mean_ship:8.3f} {mean_new:8.3f} {mean_new - mean_ship:+10.3f}")
    print(f"worst per-concept IoU difference {worst:.3f}; FVU within 10 %: {summary['fvu_within_10pct']}; "
          f"mean IoU within 0.05: {summary['iou_mean_within_005']}")
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
