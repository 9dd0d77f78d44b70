"""Train the shapes model's SAE and learn a concept dictionary for every shape and colour.

    python -m shapes_world.learn --out shapes_world/weights            # the colour SAE and concepts
    python -m shapes_world.learn --out shapes_world/weights --concepts-only --negatives \
        --concepts red,green,blue,yellow,purple,cyan                    # the shipped colour concepts
    python -m shapes_world.learn --out shapes_world/weights/shapes --block up_blocks.0.attentions.1 \
        --concepts circle,square,triangle,cross --k 8 --object-share 0.5 ...   # the shape SAE (README "Shapes world")

1. Sample captions from the scene generator with the shipped model and record the cond-branch outputs of
   one 16x16 transformer block at every DDIM step (``ActivationTap`` through ``sae_core.torch_hooks``).
2. Train a ReLU-TopK SAE on them with ``sae_core.train`` and write it in the pack's native format.
3. Learn each concept the way the Learn Concept node does: ``ConceptCollector`` hooks the block, a
   ``ConceptStatsAccumulator`` per concept receives the codes of the prompts that name it (label = the
   concept) and of the prompts that do not (label = "contrast"), and ``build_concept_dictionary`` selects
   the latents. One concept file per shape and colour, bound to the SAE's fingerprint. With ``--negatives`` each
   other concept's images (showing it, not the concept learned) are also a contrast group of their own that a
   latent must stay silent on (hard negatives; the shipped colour files are learned so, see the README).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from sae_core.collector import ConceptCollector
from sae_core.concept_stats import ConceptStatsAccumulator
from sae_core.concepts import ConceptDictionary
from sae_core.formats import save_native
from sae_core.gate import learn_presence_gate
from sae_core.sae import SparseAutoencoder
from sae_core.selection import SelectionRule, build_concept_dictionary
from sae_core.steps import StepInfo, chunk_rows
from sae_core.train import TrainConfig, fraction_of_variance_unexplained, train_sae

from .evaluator import load_evaluator
from .model import ShapesModel, load_model
from .render import render
from .scenes import COLOURS, SHAPES, generate_scenes, parse_caption

logger = logging.getLogger(__name__)

BLOCK = "up_blocks.1.attentions.1"
CONCEPTS: tuple[str, ...] = SHAPES + COLOURS
CONTRAST = "contrast"
SAE_NAME = "sae.safetensors"
CONCEPT_DIR = "concepts"
# The rule measured best for the shapes SAE (README "Shapes world"): at most 8 latents per step, each active on
# at least 0.2 % of the concept prompts' patches and at most a fifth as often on the other prompts.
RULE = SelectionRule("specific", top_n=8, max_ratio=0.2, min_rate=0.002)


def names_in(caption: str) -> set[str]:
    """The shapes and colours a caption names."""
    return {x for pair in parse_caption(caption).objects for x in pair}


class ActivationTap:
    """A block intervention that stores the rows of the cond branch (fp16, on the CPU) and changes nothing."""

    def __init__(self):
        self.rows: list[Tensor] = []

    def __call__(self, block_in: Tensor | None, block_out: Tensor, step: StepInfo) -> Tensor:
        for p in chunk_rows(block_out.shape[0], step.chunks, (0,)):
            self.rows.append(rearrange(block_out[p.start:p.stop], "b c h w -> (b h w) c").detach().to("cpu", torch.float16))
        return block_out

    def tensor(self) -> Tensor:
        if not self.rows:
            raise RuntimeError("ActivationTap: nothing recorded; was the block run with the tap attached?")
        return torch.cat(self.rows)


def collect_activations(model: ShapesModel, captions: list[str], block: str = BLOCK, seed: int = 0,
                        steps: int = 20, cfg: float = 3.0, batch: int = 32) -> Tensor:
    """[rows, C] fp16 block outputs of the cond branch, every step, for every caption."""
    tap = ActivationTap()
    for i in range(0, len(captions), batch):
        render(model, captions[i:i + batch], seed=seed + i, steps=steps, cfg=cfg, interventions={block: tap})
    return tap.tensor()


class _Fanout:
    """Feeds one block call's codes to one collector per concept (each with its own label and accumulator) and,
    optionally, to one collector that keeps every image's codes under its caption (for the presence gates)."""

    def __init__(self, collectors: dict[str, ConceptCollector], samples: ConceptCollector | None = None):
        self.collectors = dict(collectors)
        if samples is not None:
            self.collectors[" samples"] = samples
        self.samples = samples

    def label(self, caption: str, index: int = 0) -> None:
        present = names_in(caption)
        for name, col in self.collectors.items():
            col.concept = name if name in present else CONTRAST
        if self.samples is not None:
            self.samples.concept, self.samples.sample = caption, index

    def __call__(self, block_in, block_out, step):
        for col in self.collectors.values():
            col(block_in, block_out, step)
        return block_out


class ObjectShare:
    """A block intervention that measures, per step and latent, the share of its firings that fall on object patches.

    Codes of the cond rows are kept until the image is done; ``image_done`` labels it with the pixel evaluator
    (a patch is an object patch when half its pixels belong to some object, of any shape or colour) and counts.
    The shape SAE needs it: at 8x8 the words of the prompt reach every patch, so latents that fire on the
    *background* of the images whose prompt names a circle are as specific to "circle" as the ones on the circle.
    """

    def __init__(self, sae: SparseAutoencoder, evaluator):
        self.sae, self.evaluator = sae, evaluator
        self.on: dict[float, Tensor] = {}
        self.total: dict[float, Tensor] = {}
        self._pending: list[tuple[float, Tensor]] = []

    def __call__(self, block_in: Tensor | None, block_out: Tensor, step: StepInfo) -> Tensor:
        for p in chunk_rows(block_out.shape[0], step.chunks, (0,)):
            with torch.no_grad():
                codes = self.sae.encode(rearrange(block_out[p.start:p.stop], "b c h w -> b h w c"))
            self._pending.append((round(float(step.timestep), 3), codes > 0))
        return block_out

    def image_done(self, images: Tensor) -> None:
        shape_map, _ = self.evaluator.label(images)
        for key, fires in self._pending:
            obj = F.adaptive_avg_pool2d((shape_map > 0).float()[:, None], tuple(fires.shape[1:3]))[:, 0] >= 0.5
            on = (fires & obj[..., None]).flatten(0, 2).sum(0, dtype=torch.float64)
            tot = fires.flatten(0, 2).sum(0, dtype=torch.float64)
            self.on[key] = self.on.get(key, 0) + on
            self.total[key] = self.total.get(key, 0) + tot
        self._pending.clear()

    def share(self, timesteps: Tensor) -> Tensor:
        """[T, M] float64 share of each latent's firings on object patches, rows in the order of ``timesteps``."""
        keys = [round(float(t), 3) for t in timesteps]
        missing = [k for k in keys if k not in self.on]
        if missing:
            raise ValueError(f"ObjectShare: no codes recorded at timesteps {missing[:5]}; run it on the same sampler")
        return torch.stack([self.on[k] / self.total[k].clamp_min(1) for k in keys])


def learn_concepts(model: ShapesModel, sae: SparseAutoencoder, captions: list[str], block: str = BLOCK,
                   rule: SelectionRule = RULE, seed: int = 0, steps: int = 20, cfg: float = 3.0,
                   concepts: tuple[str, ...] = CONCEPTS, object_share: float = 0.0,
                   negatives: bool = False) -> dict[str, ConceptDictionary]:
    """One dictionary per concept, learned from the prompts that name it against the ones that do not.

    Each caption is sampled once (batch 1, so every model call carries one prompt's rows and one label per
    concept) with all concepts' collectors on the block. ``object_share`` > 0 keeps only latents with at least
    that share of their firings on object patches (``ObjectShare``; 0 = every latent, as Learn Concept does).
    """
    if not 0.0 <= object_share < 1.0:
        raise ValueError(f"learn_concepts: object_share is {object_share}, expected a share in [0, 1) (0 = off)")
    accs = {c: ConceptStatsAccumulator(int(sae.cfg.n_latents)) for c in concepts}
    samples = _sample_accumulator(sae)
    fan = _Fanout({c: ConceptCollector(sae, accs[c], branches="cond", label=block) for c in concepts},
                  ConceptCollector(sae, samples, branches="cond", label=block))
    objects = ObjectShare(sae, load_evaluator()) if object_share > 0 else None
    chain = [fan] if objects is None else [fan, objects]
    for i, caption in enumerate(captions):
        fan.label(caption, i)
        images = render(model, [caption], seed=seed + i, steps=steps, cfg=cfg, interventions={block: chain})
        if objects is not None:
            objects.image_done(images)
    out = {}
    for c in concepts:
        if len(accs[c].names) < 2:
            raise ValueError(
                f"learn_concepts: concept {c!r} has prompts only on one side ({accs[c].names}); use more captions"
            )
        stats = accs[c].stats()
        if objects is not None:
            k = stats.names.index(c)
            rates = stats.rates.clone()
            rates[k] = torch.where(objects.share(stats.timesteps) >= object_share, rates[k], torch.zeros_like(rates[k]))
            stats = stats._replace(rates=rates)
        neg = _negative_rates(samples, c, stats.timesteps) if negatives else None
        d = build_concept_dictionary(
            stats, rule, keep=[c], sae_fingerprint=sae.fingerprint(), hook_point=block,
            prompts={c: [p for p in captions if c in names_in(p)], CONTRAST: [p for p in captions if c not in names_in(p)]},
            negatives=neg,
        )
        out[c] = learn_presence_gate(d, samples, _caption_shows)
    return out


NEGATIVE_MIN_IMAGES = 8


def _negative_rates(samples: ConceptStatsAccumulator, concept: str, timesteps: Tensor) -> Tensor:
    """[G, T, M]: per other concept c' (shape or colour) with enough images, the firing rates over the images whose
    caption shows c' and not ``concept`` (every image was kept under its caption)."""
    groups: dict[str, list] = {}
    for key in samples.samples:
        shown = names_in(key[0])
        if concept in shown:
            continue
        for other in shown:
            groups.setdefault(other, []).append(key)
    return samples.group_rates([keys for _, keys in sorted(groups.items()) if len(keys) >= NEGATIVE_MIN_IMAGES],
                               timesteps)


def _sample_accumulator(sae: SparseAutoencoder) -> ConceptStatsAccumulator:
    """Keeps every image's codes (all of them for a TopK SAE) under its caption, for the presence gates."""
    return ConceptStatsAccumulator(int(sae.cfg.n_latents), keep_samples=True,
                                   sample_top=int(sae.cfg.k) if sae.cfg.k else 64)


def _caption_shows(concept: str, caption: str) -> bool:
    return concept in names_in(caption)


def learn_gates(model: ShapesModel, sae: SparseAutoencoder, dicts: dict[str, ConceptDictionary], captions: list[str],
                block: str = BLOCK, seed: int = 0, steps: int = 20, cfg: float = 3.0, batch: int = 32
                ) -> dict[str, ConceptDictionary]:
    """The presence gates of existing dictionaries (their latents unchanged), learned from ``captions`` sampled in
    batches; for concept files written before the gate existed."""
    samples = _sample_accumulator(sae)
    col = ConceptCollector(sae, samples, branches="cond", label=block)
    for i in range(0, len(captions), batch):
        col.concept, col.sample = "batch", i
        render(model, captions[i:i + batch], seed=seed + i, steps=steps, cfg=cfg, interventions={block: col})
    # one label per image: its caption
    samples.samples = {(captions[i + b], (i, b), 0): v for (_, i, b), v in samples.samples.items()}
    return {c: learn_presence_gate(d, samples, _caption_shows) for c, d in dicts.items()}


@dataclass
class LearnSettings:
    activation_captions: int = 768
    concept_captions: int = 384
    caption_seed: int = 30_000_001
    concept_caption_seed: int = 40_000_003
    n_latents: int = 1024
    k: int = 4
    sae_steps: int = 3000
    sae_batch: int = 2048
    sae_rows: int = 1_000_000
    block: str = BLOCK
    concepts: str = ""
    """Comma-separated concepts to learn; empty = every shape and colour."""
    top_n: int = RULE.top_n
    max_ratio: float = RULE.max_ratio
    min_rate: float = RULE.min_rate
    object_share: float = 0.0
    """> 0: keep only latents with at least this share of their firings on object patches (see ObjectShare)."""
    negatives: bool = False
    """Each other concept's images (showing it, not the one learned) are a contrast group of their own that a
    latent must stay silent on (SelectionRule "specific" with hard negatives), not only on their average."""

    def concept_names(self) -> tuple[str, ...]:
        names = tuple(c.strip() for c in self.concepts.split(",") if c.strip()) or CONCEPTS
        bad = [c for c in names if c not in CONCEPTS]
        if bad:
            raise ValueError(f"LearnSettings.concepts: unknown {bad}; expected some of {list(CONCEPTS)}")
        return names

    def rule(self) -> SelectionRule:
        return SelectionRule("specific", top_n=self.top_n, max_ratio=self.max_ratio, min_rate=self.min_rate)


def build(model: ShapesModel, out: Path, s: LearnSettings) -> dict:
    """Everything: activations -> SAE -> concept files under ``out``; returns a summary (also written as JSON)."""
    out.mkdir(parents=True, exist_ok=True)
    s.concept_names()  # unknown names fail before the long steps
    t0 = time.time()
    caps = generate_scenes(s.activation_captions, seed=s.caption_seed).captions
    acts = collect_activations(model, caps, s.block)
    g = torch.Generator().manual_seed(0)
    rows = acts[torch.randint(0, acts.shape[0], (min(s.sae_rows, acts.shape[0]),), generator=g)].float()
    logger.info("collected %d rows x %d channels at %s in %.0f s", acts.shape[0], acts.shape[1], s.block, time.time() - t0)
    res = train_sae(rows, TrainConfig(n_latents=s.n_latents, k=s.k, steps=s.sae_steps, batch_size=s.sae_batch),
                    sae_config={"provenance": {"model": "shapes_world", "block": s.block, "trained_with": "sae_core.train"}})
    sae = res.sae
    fvu = fraction_of_variance_unexplained(sae, rows[:200_000])
    save_native(sae, out / SAE_NAME)
    logger.info("SAE M=%d k=%d: FVU %.4f, dead %.3f", s.n_latents, s.k, fvu, res.log[-1]["dead_fraction"])
    dicts = _learn_and_save(model, sae, out, s)
    summary = {"settings": s.__dict__, "fvu": fvu, "dead_fraction": res.log[-1]["dead_fraction"],
               "latents_per_step": {n: float((d.latents >= 0).sum(-1).float().mean()) for n, d in dicts.items()},
               "seconds": time.time() - t0}
    (out / "sae_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _learn_and_save(model: ShapesModel, sae: SparseAutoencoder, out: Path, s: LearnSettings) -> dict[str, ConceptDictionary]:
    captions = generate_scenes(s.concept_captions, seed=s.concept_caption_seed).captions
    dicts = learn_concepts(model, sae, captions, s.block, s.rule(), concepts=s.concept_names(),
                           object_share=s.object_share, negatives=s.negatives)
    (out / CONCEPT_DIR).mkdir(exist_ok=True)
    for name, d in dicts.items():
        d.save(out / CONCEPT_DIR / f"{name}.safetensors")
    return dicts


def relearn_concepts(model: ShapesModel, out: Path, s: LearnSettings) -> None:
    """The concept files of ``s.concepts`` learned again (latents and gates) with the SAE kept under ``out``."""
    from sae_core.formats import load_sae

    sae = load_sae(out / SAE_NAME)
    dicts = _learn_and_save(model, sae, out, s)
    for name, d in dicts.items():
        logger.info("%s: %.2f latents per step, gate reliable on %d of %d steps", name,
                    float((d.latents >= 0).sum(-1).float().mean()), int(d.reliable.sum()), d.reliable.numel())
    note_relearned(out, dicts, s)


def note_relearned(out: Path, dicts: dict[str, ConceptDictionary], s: LearnSettings) -> None:
    """Record concepts learned again in ``out``'s sae_summary.json (if there is one): their latents per step, and
    under "relearned" the settings they were learned with (hard negatives or not, the selection's max_ratio)."""
    path = out / "sae_summary.json"
    if not path.is_file():
        return
    summary = json.loads(path.read_text())
    summary.setdefault("latents_per_step", {}).update(
        {n: float((d.latents >= 0).sum(-1).float().mean()) for n, d in dicts.items()})
    summary.setdefault("relearned", {}).update({n: {"negatives": s.negatives, "concept_captions": s.concept_captions,
                                                    "object_share": s.object_share, "max_ratio": s.max_ratio}
                                                for n in dicts})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(path)


def add_gates(model: ShapesModel, out: Path, s: LearnSettings) -> None:
    """Presence gates for the concept files under ``out`` (latents untouched), rewritten in place."""
    from sae_core.concepts import load_concepts
    from sae_core.formats import load_sae

    sae = load_sae(out / SAE_NAME)
    files = sorted((out / CONCEPT_DIR).glob("*.safetensors"))
    dicts = {f.stem: load_concepts(f, sae=sae) for f in files}
    captions = generate_scenes(s.concept_captions, seed=s.concept_caption_seed).captions
    for name, d in learn_gates(model, sae, dicts, captions, s.block).items():
        d.save(out / CONCEPT_DIR / f"{name}.safetensors")
        logger.info("%s: gate learned, %d of %d steps reliable", name, int(d.reliable.sum()), d.reliable.numel())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=Path(__file__).parent / "weights")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    for f, v in LearnSettings().__dict__.items():
        if isinstance(v, bool):
            p.add_argument("--" + f.replace("_", "-"), action=argparse.BooleanOptionalAction, default=v)
        else:
            p.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    only = p.add_mutually_exclusive_group()
    only.add_argument("--gates-only", action="store_true",
                      help="keep the SAE and the concepts' latents under --out; learn only their presence gates")
    only.add_argument("--concepts-only", action="store_true",
                      help="keep the SAE under --out; learn the concepts of --concepts again (latents and gates)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    model, _ = load_model(a.ckpt)
    s = LearnSettings(**{f: getattr(a, f) for f in LearnSettings().__dict__})
    if a.gates_only:
        add_gates(model, a.out, s)
        return
    if a.concepts_only:
        relearn_concepts(model, a.out, s)
        return
    summary = build(model, a.out, s)
    logger.info("wrote %s: %s", a.out, json.dumps(summary))


if __name__ == "__main__":
    main()
