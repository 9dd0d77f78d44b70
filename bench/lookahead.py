"""What look-ahead costs: sampling time of Patch Replacer with look-ahead against the plain, unpatched sampling
of the same prompts and seeds, on the shapes model through sae_core.torch_hooks (the diffusers route).

    python bench/lookahead.py [--rounds 5] [--batch 8] [--steps 20] [--threads 1] [--json out.json]

Five configurations (plain, PER, PER with look-ahead, with the denoised fill too, and with the detection keeping
the concept's kind, the other colours of a colour: the recommended PER) run once per round, the order rotating
each round (interleaved, so drift on a shared machine hits all alike); after one warm-up round the median over
rounds is taken. Printed: the medians, the ratios to the plain sampling of the same run, and the spread of the
plain time ((max - min) / median): ratio differences below it are noise. Look-ahead samples twice (the first pass
detects only), so its floor is 2x plus the detector's share of pass 1; the target is <= 2.05x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/lookahead.py` from a checkout

from sae_core.intervention import ReplaceSettings  # noqa: E402
from sae_core.lookahead import LookAheadSettings, sample_twice  # noqa: E402
from shapes_world.erasure import DETECTION, intervention, load_world, prompt_sets  # noqa: E402
from shapes_world.render import render  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", default="red")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    world = load_world()  # every concept: the recommended detection keeps the concept's kind (others_to_keep)
    target, other = prompt_sets(a.concept, a.batch // 2, a.batch - a.batch // 2)
    caps = target + other
    edit = ReplaceSettings("background")

    def plain():
        return render(world.model, caps, steps=a.steps)

    def per():
        iv = intervention(world, a.concept, edit, detection=DETECTION)
        return render(world.model, caps, steps=a.steps, interventions={world.block: iv})

    def twice(edit: ReplaceSettings, keep_others: bool = False):
        iv = intervention(world, a.concept, edit, detection=DETECTION, lookahead=LookAheadSettings(),
                          keep_others=keep_others)
        return sample_twice([iv], lambda: render(world.model, caps, steps=a.steps, interventions={world.block: iv}))

    def lookahead():
        return twice(edit)

    def filled():
        return twice(ReplaceSettings("background", denoised=True))

    def kept():
        return twice(ReplaceSettings("background", denoised=True), keep_others=True)

    configs = {"plain": plain, "PER": per, "PER look-ahead": lookahead, "+ denoised fill": filled,
               "+ keep the other concepts": kept}
    times: dict[str, list[float]] = {k: [] for k in configs}
    names = list(configs)
    for r in range(a.rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            configs[name]()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = (max(times["plain"]) - min(times["plain"])) / med["plain"]
    print(f"{a.batch} prompts x {a.steps} steps, {a.rounds} rounds, {a.threads} thread(s); plain spread {spread:.3f}")
    for k in names:
        print(f"{k:26s} median {med[k]:7.3f} s   ratio {med[k] / med['plain']:.3f}")
    out = {"median_s": med, "ratio": {k: med[k] / med["plain"] for k in names}, "plain_spread": spread,
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "json"}}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
