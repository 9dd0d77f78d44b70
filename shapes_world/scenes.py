"""Procedural 32x32 scenes of coloured shapes with captions and exact per-pixel ground truth."""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
BACKGROUNDS: tuple[str, ...] = ("black", "grey", "white")
TEXTURES: tuple[str, ...] = ("plain", "striped")
MAX_OBJECTS = 3

# Nominal RGB in [0, 1]; each object gets a small per-channel jitter around these.
COLOUR_RGB = torch.tensor(
    [
        [0.90, 0.10, 0.10],  # red
        [0.10, 0.75, 0.15],  # green
        [0.15, 0.25, 0.95],  # blue
        [0.95, 0.90, 0.10],  # yellow
        [0.60, 0.15, 0.80],  # purple
        [0.10, 0.85, 0.90],  # cyan
    ]
)
BACKGROUND_GREY = torch.tensor([0.06, 0.50, 0.94])

# Every shape fits in a disc of radius BOUND * r around its centre; placement keeps these discs apart.
_BOUND = 1.22
_COUNT_PROBS = torch.tensor([0.4, 0.35, 0.25])  # one, two, three objects


class Scenes(NamedTuple):
    """A batch of scenes. Object slots are ordered left to right; absent slots hold -1 ids."""

    images: torch.Tensor  # [B, 3, H, W] float in [0, 1]
    masks: torch.Tensor  # [B, MAX_OBJECTS, H, W] bool, visible pixels of each object slot
    shape_map: torch.Tensor  # [B, H, W] long: 0 background, 1 + shape id
    colour_map: torch.Tensor  # [B, H, W] long: 0 background, 1 + colour id
    shape_ids: torch.Tensor  # [B, MAX_OBJECTS] long, -1 where the slot is empty
    colour_ids: torch.Tensor  # [B, MAX_OBJECTS] long, -1 where the slot is empty
    centres: torch.Tensor  # [B, MAX_OBJECTS, 2] float (x, y) in pixels
    radii: torch.Tensor  # [B, MAX_OBJECTS] float, 0 where the slot is empty
    background_ids: torch.Tensor  # [B] long
    texture_ids: torch.Tensor  # [B] long
    captions: list[str]


def shape_masks(
    shape_ids: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, size: int = 32
) -> torch.Tensor:
    """Binary masks [..., size, size] of shapes with ids [...], centres [..., 2] and radii [...].

    Pixel (row i, column j) is tested at its centre (j + 0.5, i + 0.5); no anti-aliasing, so the
    rendered pixels and the masks agree exactly. Ids outside the shape table give empty masks.
    """
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords.view(1, size) - centres[..., 0, None, None]
    dy = coords.view(size, 1) - centres[..., 1, None, None]
    r = radii[..., None, None]
    adx, ady = dx.abs(), dy.abs()
    circle = dx * dx + dy * dy <= r * r
    square = torch.maximum(adx, ady) <= 0.8 * r
    # Triangle pointing up: apex at (0, -r), base corners at (+-0.95 r, 0.75 r).
    triangle = (dy <= 0.75 * r) & (adx * 1.75 <= 0.95 * (dy + r))
    arm, half = 0.32 * r, 0.9 * r
    cross = ((adx <= half) & (ady <= arm)) | ((adx <= arm) & (ady <= half))
    ids = shape_ids[..., None, None]
    return (
        ((ids == 0) & circle)
        | ((ids == 1) & square)
        | ((ids == 2) & triangle)
        | ((ids == 3) & cross)
    )


def caption_for(shape_ids, colour_ids, background_id: int, texture_id: int) -> str:
    """Caption of one scene; objects in the given (left-to-right) order, empty slots (-1) skipped."""
    parts = [
        f"a {COLOURS[int(c)]} {SHAPES[int(s)]}"
        for s, c in zip(shape_ids, colour_ids, strict=True)
        if int(s) >= 0
    ]
    texture = " striped" if TEXTURES[texture_id] == "striped" else ""
    return f"{' and '.join(parts)} on a {BACKGROUNDS[background_id]}{texture} background"


class ParsedCaption(NamedTuple):
    objects: list[tuple[str, str]]  # (colour, shape) in caption order
    background: str | None
    texture: str


_OBJECT_RE = re.compile(rf"^a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})$")
_BACKGROUND_RE = re.compile(rf"^a ({'|'.join(BACKGROUNDS)})( striped)? background$")


def parse_caption(caption: str) -> ParsedCaption:
    """Inverse of caption_for; also accepts captions without the background clause.

    Raises ValueError naming the part that does not fit the grammar
    "a <colour> <shape> [and a <colour> <shape>]* [on a <background> [striped] background]".
    """
    text = " ".join(caption.strip().lower().split())
    head, sep, tail = text.partition(" on ")
    background, texture = None, "plain"
    if sep:
        m = _BACKGROUND_RE.match(tail)
        if m is None:
            raise ValueError(
                f"caption {caption!r}: background clause {tail!r} is not 'a <background> [striped] "
                f"background' with background in {BACKGROUNDS}"
            )
        background, texture = m.group(1), "striped" if m.group(2) else "plain"
    objects = []
    for part in head.split(" and "):
        m = _OBJECT_RE.match(part)
        if m is None:
            raise ValueError(
                f"caption {caption!r}: object {part!r} is not 'a <colour> <shape>' with colour in "
                f"{COLOURS} and shape in {SHAPES}"
            )
        objects.append((m.group(1), m.group(2)))
    return ParsedCaption(objects, background, texture)


def _uniform(gen: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def generate_scenes(
    n: int,
    seed: int,
    size: int = 32,
    max_objects: int = MAX_OBJECTS,
    radius_range: tuple[float, float] = (4.0, 8.0),  # for one object; shrunk for two or three
    striped_prob: float = 0.25,
    candidates: int = 48,
) -> Scenes:
    """Draw n scenes, deterministic in (n, seed, arguments). Vectorised over the batch.

    Each scene has 1..max_objects shapes with distinct (colour, shape) pairs whose bounding discs are
    at least one pixel apart (so no object hides another); a scene whose drawn objects cannot be
    placed in `candidates` tries keeps fewer objects. Objects are ordered left to right, and the
    caption names them in that order.
    """
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"generate_scenes: max_objects={max_objects}, expected 1..{MAX_OBJECTS}")
    if n < 1:
        raise ValueError(f"generate_scenes: n={n}, expected at least one scene")
    gen = torch.Generator().manual_seed(int(seed))
    k = MAX_OBJECTS
    probs = _COUNT_PROBS[:max_objects]
    count = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen) + 1  # [n]
    # Distinct (colour, shape) pairs per scene.
    combo = torch.rand(n, len(SHAPES) * len(COLOURS), generator=gen).argsort(dim=1)[:, :k]
    shape_ids, colour_ids = combo % len(SHAPES), combo // len(SHAPES)

    # Crowded scenes get smaller shapes, or three objects would rarely fit on 32x32.
    lo = radius_range[0] - 0.25 * (count - 1).float()
    hi = radius_range[1] - 1.25 * (count - 1).float()
    radii = lo.view(n, 1, 1) + (hi - lo).view(n, 1, 1) * torch.rand(n, candidates, k, generator=gen)
    margin = _BOUND * radii
    centres = margin[..., None] + torch.rand(n, candidates, k, 2, generator=gen) * (
        size - 2 * margin[..., None]
    )
    dist = (centres[:, :, :, None, :] - centres[:, :, None, :, :]).norm(dim=-1)  # [n, C, k, k]
    need = margin[:, :, :, None] + margin[:, :, None, :] + 1.0
    slot = torch.arange(k)
    both = (slot[:, None] < count[:, None, None]) & (slot[None, :] < count[:, None, None])  # [n, k, k]
    clash = (dist < need) & both[:, None] & (slot[:, None] != slot[None, :])
    ok = ~clash.flatten(2).any(-1)  # [n, C]
    has_ok = ok.any(1)
    pick = ok.float().argmax(1)  # first placement without a clash (0 if none)
    count = torch.where(has_ok, count, torch.ones_like(count))
    idx = torch.arange(n)
    radii, centres = radii[idx, pick], centres[idx, pick]  # [n, k], [n, k, 2]

    present = slot[None, :] < count[:, None]
    # Order slots left to right; absent slots go last.
    key = torch.where(present, centres[..., 0], torch.full_like(radii, float("inf")))
    order = key.argsort(dim=1)
    gather = lambda t: t.gather(1, order) if t.dim() == 2 else t.gather(1, order[..., None].expand_as(t))  # noqa: E731
    shape_ids, colour_ids, radii, centres = map(gather, (shape_ids, colour_ids, radii, centres))
    present = present.gather(1, order)
    shape_ids = torch.where(present, shape_ids, -1)
    colour_ids = torch.where(present, colour_ids, -1)
    radii = torch.where(present, radii, 0.0)
    centres = torch.where(present[..., None], centres, 0.0)

    background_ids = torch.randint(len(BACKGROUNDS), (n,), generator=gen)
    texture_ids = (torch.rand(n, generator=gen) < striped_prob).long()
    bg_level = BACKGROUND_GREY[background_ids] + _uniform(gen, (n,), -0.04, 0.04)
    images = bg_level.view(n, 1, 1, 1).expand(n, 3, size, size).clone()
    # Stripes: period 4 px, horizontal / vertical / diagonal, lighter or darker than the background.
    direction = torch.randint(3, (n,), generator=gen)
    phase = torch.randint(4, (n,), generator=gen)
    rr = torch.arange(size).view(size, 1)
    cc = torch.arange(size).view(1, size)
    lines = torch.stack([rr.expand(size, size), cc.expand(size, size), rr + cc])  # [3, H, W]
    on_stripe = ((lines[direction] + phase.view(n, 1, 1)) % 4) < 2  # [n, H, W]
    amp = torch.where(background_ids == 2, -0.12, 0.12).view(n, 1, 1)
    images += (on_stripe & (texture_ids.view(n, 1, 1) == 1)).float().mul(amp).unsqueeze(1)

    masks = shape_masks(shape_ids, centres, radii, size) & present[..., None, None]  # [n, k, H, W]
    # Painter's order: later slots cover earlier ones, so masks always mean "visible pixels".
    covered = torch.zeros(n, size, size, dtype=torch.bool)
    for j in reversed(range(k)):
        masks[:, j] &= ~covered
        covered |= masks[:, j]
    rgb = _jittered_rgb(gen, colour_ids)  # [n, k, 3]
    shape_map = torch.zeros(n, size, size, dtype=torch.long)
    colour_map = torch.zeros(n, size, size, dtype=torch.long)
    for j in range(k):
        m = masks[:, j]
        images = torch.where(m[:, None], rgb[:, j, :, None, None], images)
        shape_map = torch.where(m, shape_ids[:, j, None, None] + 1, shape_map)
        colour_map = torch.where(m, colour_ids[:, j, None, None] + 1, colour_map)
    images = images.clamp(0.0, 1.0)
    captions = [
        caption_for(shape_ids[i].tolist(), colour_ids[i].tolist(), int(background_ids[i]), int(texture_ids[i]))
        for i in range(n)
    ]
    return Scenes(
        images, masks, shape_map, colour_map, shape_ids, colour_ids, centres, radii,
        background_ids, texture_ids, captions,
    )


def _jittered_rgb(gen: torch.Generator, colour_ids: torch.Tensor) -> torch.Tensor:
    """RGB per object slot: the nominal colour plus uniform jitter of +-0.05 per channel."""
    base = COLOUR_RGB[colour_ids.clamp(min=0)]
    return (base + _uniform(gen, base.shape, -0.05, 0.05)).clamp(0.0, 1.0)


def main(argv: list[str] | None = None) -> None:
    """Print generated captions, one per line (a prompt file for `python -m sae_core collect`)."""
    import argparse

    p = argparse.ArgumentParser(description="print the captions of n generated scenes, one per line")
    p.add_argument("--n", type=int, required=True, help="number of scenes")
    p.add_argument("--seed", type=int, required=True, help="scene seed (shapes_world.learn uses 30000001)")
    a = p.parse_args(argv)
    for c in generate_scenes(a.n, seed=a.seed).captions:
        print(c)  # noqa: T201 - this command's output is the prompt file


if __name__ == "__main__":
    main()
