"""Artifact judge for shapes-world images: what a person sees as wrong, from the pixels and the caption alone.

The pixel evaluator (``shapes_world.evaluator``) names what it sees; where it is unsure, ``erasure.unrecognised``
counts the pixel. That misses what the evaluator confidently calls "background" although a person sees a smudge:
a grey ghost blob on a grey or striped background, a stripe that stops in the middle of the image. This judge
does not use the evaluator. It knows what the scene generator draws (``shapes_world.scenes``): a background of
one grey level, or of two levels in stripes of period 4 (horizontal, vertical or diagonal); objects filled with
one of the six palette colours (small jitter); and it knows what the caption asked for. Per image:

1. Background: the grey, non-palette pixels split into two levels (2-means on brightness). Levels further apart
   than ``stripe_contrast``, each holding a fifth of the pixels, make a striped background; then every pixel
   takes the stripe direction and phase that fit its 5x5 neighbourhood best. Stripes may bend (the sampler's
   do) but not turn by 90 degrees against the image's main direction, and a patch where they stop fits no layout.
2. Pixels: *palette* (within ``palette_tol`` of a palette colour, per channel); *objects* are palette groups of
   one colour with at least ``min_object`` pixels, smaller groups are *fragments*. *Edge*: off the background but
   on the blend of its background and the colour of an object pixel within two pixels (the rim a sampler
   leaves). *Odd*: not palette, not edge, and either more than ``bg_tol`` from its expected background or
   with a residual, averaged over the 3x3 pixels that are background by themselves, above ``smooth_tol``
   (faint blobs noise cannot make); fragments are odd too.
3. Blobs: 8-connected groups of odd pixels with at least ``min_blob`` pixels. A blob is a *smudge* when its
   pixels are coloured (mean chroma over ``grey_chroma``), a *broken_stripe* when it is grey and most of its
   pixels sit at the other stripe level, a *ghost* otherwise (grey, at no level of the background).
4. *unnamed_colour*: a palette group of at least ``min_blob`` pixels in a colour the caption does not name (a
   recoloured object, a copied neighbour of an unnamed colour).

These four are DEFECTS: an image with any of them is an artifact. Two MISMATCHES with the caption are reported
but not counted, because the model makes them on its own: *extra_object* (more objects of a named colour than
the caption has: copied neighbours, and the model's duplicates in a quarter of its unedited images) and
*background* (the fitted base level more than ``level_tol`` from the caption's, or stripes it did not ask for).
Clean generator scenes give no reason at all; ``bench/artifact_judge.py`` measures the model's own renders and
the edits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .scenes import BACKGROUND_GREY, BACKGROUNDS, COLOUR_RGB, COLOURS, parse_caption

# Local defects: what an edit smears into the picture. An image with any of them is an artifact.
DEFECTS: tuple[str, ...] = ("smudge", "ghost", "broken_stripe", "unnamed_colour")
# Content that disagrees with the caption although every pixel is clean: the shapes model itself draws a
# duplicate object in about a quarter of its unedited images, so these are reported, not counted as artifacts.
MISMATCHES: tuple[str, ...] = ("extra_object", "background")
REASONS: tuple[str, ...] = DEFECTS + MISMATCHES
EDGE_RADIUS = 2  # how far from a palette pixel a blended rim pixel may lie
PERIOD = 4  # the generator's stripe period (two pixels on, two off)


@dataclass(frozen=True)
class JudgeSettings:
    """Tolerances of the judge; the defaults are set on the model's unedited renders (noise ~0.015 per channel)."""

    bg_tol: float = 0.07
    """Per-channel distance from the expected background colour still counted as background (stripes differ by 0.12)."""
    smooth_tol: float = 0.035
    """The same for the residual averaged over a pixel's 3x3 non-palette neighbourhood (faint, extended blobs)."""
    palette_tol: float = 0.2
    """Per-channel distance from a palette colour still counted as that colour (palette colours are >= 0.45 apart)."""
    mix_tol: float = 0.12
    """Distance of an edge pixel from the segment between its background and a palette neighbour's colour."""
    min_blob: int = 5
    """Pixels an odd blob (or a patch of an unnamed palette colour) needs to count."""
    min_object: int = 10
    """Pixels a group of a named colour needs to count as an object (the generator's smallest objects have ~20)."""
    stripe_contrast: float = 0.05
    """Level difference above which the background is read as striped (the generator's stripes: 0.12)."""
    grey_chroma: float = 0.15
    """Mean chroma (max - min channel) below which a blob is grey (palette colours have chroma >= 0.65)."""
    level_tol: float = 0.15
    """Distance of the fitted background level from the caption's above which the background is wrong."""

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"JudgeSettings.{k}={v!r}: expected a positive number")


class Judgement(NamedTuple):
    artifact: Tensor  # [B] bool: any of DEFECTS fired
    reasons: dict[str, Tensor]  # reason -> [B] long: blobs / objects / 1 per image (see REASONS)
    odd_pixels: Tensor  # [B] long: pixels in counted odd blobs
    flagged: Tensor  # [B, H, W] bool: pixels of the counted blobs and objects (for pictures)
    blobs: Tensor  # [B, H, W] bool: pixels of the counted odd blobs only (smudge, ghost, broken stripe)


def rates(j: Judgement) -> dict[str, float]:
    """Share of images flagged, overall ("artifact") and per reason."""
    out = {"artifact": float(j.artifact.float().mean())}
    out.update({r: float((c > 0).float().mean()) for r, c in j.reasons.items()})
    return out


# -- connected components -------------------------------------------------------------------------------


def components(mask: Tensor) -> Tensor:
    """[B, H, W] bool -> [B, H, W] long: 8-connected components, 0 outside the mask, ids unique over the batch."""
    b, h, w = mask.shape
    ids = torch.arange(1, b * h * w + 1, dtype=torch.float64).view(b, 1, h, w)
    m = mask[:, None].to(torch.float64)
    lab = ids * m
    while True:
        # ids up to 2**53 are exact in float64; max pooling spreads the largest id through each component
        nxt = F.max_pool2d(lab, 3, stride=1, padding=1) * m
        if torch.equal(nxt, lab):
            return lab[:, 0].long()
        lab = nxt


def _blob_table(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(inverse [B, H, W] long, -1 outside; counts [K]; image index [K]) of the components in ``labels``."""
    flat = labels.flatten()
    inside = flat > 0
    uniq, inv, counts = torch.unique(flat[inside], return_inverse=True, return_counts=True)
    hw = labels.shape[1] * labels.shape[2]
    full = torch.full_like(flat, -1)
    full[inside] = inv
    return full.view_as(labels), counts, (uniq - 1) // hw


# -- background model -----------------------------------------------------------------------------------


def stripe_layouts(h: int, w: int) -> Tensor:
    """[4, 4, H, W] bool: pixels on a stripe for each direction (rows, columns, both diagonals) and phase.

    The generator draws rows, columns and one diagonal; the sampler sometimes bends them the other way, which a
    person does not see as broken, so both diagonals are allowed."""
    rr = torch.arange(h).view(h, 1).expand(h, w)
    cc = torch.arange(w).view(1, w).expand(h, w)
    lines = torch.stack([rr, cc, rr + cc, rr - cc + PERIOD * w])
    return torch.stack([torch.stack([((lines[d] + p) % PERIOD) < PERIOD // 2 for p in range(PERIOD)])
                        for d in range(4)])


class Background(NamedTuple):
    expected: Tensor  # [B, 3, H, W] the fitted background colour of every pixel
    other: Tensor  # [B, 3, H, W] the other stripe level's colour there (= expected on plain backgrounds)
    striped: Tensor  # [B] bool
    level: Tensor  # [B] grey level of the base (plain level, or the level the stripes are drawn on)


def _median(x: Tensor, mask: Tensor) -> Tensor:
    """[B, 3] per-channel median of x [B, 3, H, W] over mask [B, H, W]; NaN where the mask is empty."""
    v = torch.where(mask[:, None], x, torch.full_like(x, float("nan")))
    return v.flatten(2).nanmedian(dim=2).values


def fit_background(images: Tensor, candidates: Tensor, stripe_contrast: float, window: int = 5) -> Background:
    """Background model of [B, 3, H, W] images from their ``candidates`` pixels [B, H, W] (grey, not palette).

    Plain: the per-channel median. Striped (the best stripe partition separates the mean grey levels by more
    than ``stripe_contrast``): the two levels' medians, and per pixel the stripe direction and phase that fit
    best in its ``window`` x ``window`` neighbourhood, so stripes that bend stay background while a patch where
    they stop (one level only) or cross does not fit any layout."""
    b, _, h, w = images.shape
    few = candidates.flatten(1).sum(1) < 8  # nothing grey to fit: use every pixel
    cand = candidates | few[:, None, None]
    plain = _median(images, cand)  # [B, 3]
    lum = images.mean(1)
    # two grey levels by 2-means on the candidates' brightness; a bent stripe pattern still has two levels
    lv = torch.where(cand, lum, torch.full_like(lum, float("nan"))).flatten(1)
    lo, hi = lv.nanquantile(0.1, dim=1), lv.nanquantile(0.9, dim=1)
    for _ in range(8):
        upper = lv > ((lo + hi) / 2)[:, None]
        valid = ~lv.isnan()
        lo = torch.where(valid & ~upper, lv, 0).sum(1) / (valid & ~upper).sum(1).clamp_min(1)
        hi = torch.where(valid & upper, lv, 0).sum(1) / (valid & upper).sum(1).clamp_min(1)
    upper = (lum > ((lo + hi) / 2)[:, None, None]) & cand
    share = upper.flatten(1).float().sum(1) / cand.flatten(1).float().sum(1).clamp_min(1)
    striped = ((hi - lo) > stripe_contrast) & (share > 0.2) & (share < 0.8)
    level_a, level_b = _median(images, upper), _median(images, cand & ~upper)  # [B, 3] each
    level_a = torch.where(level_a.isnan(), plain, level_a)
    level_b = torch.where(level_b.isnan(), plain, level_b)
    layouts = stripe_layouts(h, w)

    all_layouts = layouts.flatten(0, 1)  # [16, H, W]
    exp_k = torch.where(all_layouts[None, :, None], level_a[:, None, :, None, None], level_b[:, None, :, None, None])
    err = (images[:, None] - exp_k).abs().amax(2)  # [B, 16, H, W]
    c = cand[:, None].float()
    cost = F.avg_pool2d(err * c, window, stride=1, padding=window // 2) / F.avg_pool2d(
        c, window, stride=1, padding=window // 2).clamp_min(1e-6)
    # stripes may bend (to a diagonal) but not turn by 90 degrees: find the direction that fits most pixels and
    # refit without the one perpendicular to it, so a patch of crossing stripes stays odd
    best_dir = cost.view(b, 4, PERIOD, h, w).amin(2).argmin(1)  # [B, H, W]
    votes = F.one_hot(best_dir, 4).mul(cand[..., None]).flatten(1, 2).sum(1)  # [B, 4]
    perpendicular = torch.tensor([1, 0, 3, 2])[votes.argmax(1)]  # rows <-> columns, diagonal <-> anti-diagonal
    banned = (torch.arange(4)[None] == perpendicular[:, None]).repeat_interleave(PERIOD, 1)  # [B, 16]
    cost = cost.masked_fill(banned[:, :, None, None], float("inf"))
    pick = cost.argmin(1)  # [B, H, W]
    on_px = torch.gather(all_layouts[None].expand(b, -1, -1, -1), 1, pick[:, None])  # [B, 1, H, W]
    a4, b4 = level_a[:, :, None, None], level_b[:, :, None, None]
    stripe_exp = torch.where(on_px, a4, b4)
    stripe_oth = torch.where(on_px, b4, a4)
    plain4 = plain[:, :, None, None].expand(b, 3, h, w)
    s4 = striped[:, None, None, None]
    expected = torch.where(s4, stripe_exp, plain4)
    other = torch.where(s4, stripe_oth, plain4)
    mean_a, mean_b = level_a.mean(1), level_b.mean(1)
    # the generator draws lighter stripes on black and grey, darker ones on white
    base = torch.where(mean_a + mean_b < 1.4, torch.minimum(mean_a, mean_b), torch.maximum(mean_a, mean_b))
    level = torch.where(striped, base, plain.mean(1))
    return Background(expected, other, striped, level)


# -- the judge ------------------------------------------------------------------------------------------


def _neighbours(x: Tensor, radius: int = EDGE_RADIUS) -> Tensor:
    """[B, C, H, W] -> [N, B, C, H, W]: the neighbours within ``radius`` (Chebyshev) of every pixel, border replicated."""
    r = radius
    p = F.pad(x, (r, r, r, r), mode="replicate")
    h, w = x.shape[-2:]
    return torch.stack([p[..., r + dy:r + dy + h, r + dx:r + dx + w]
                        for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)])


def _mix_error(x: Tensor, base: Tensor, ends: Tensor) -> Tensor:
    """Per-channel max distance of colours x [..., 3] from the segments base [..., 3] -> ends [..., 3]."""
    d = ends - base
    v = x - base
    alpha = ((v * d).sum(-1, keepdim=True) / d.pow(2).sum(-1, keepdim=True).clamp_min(1e-6)).clamp(0, 1)
    return (v - alpha * d).abs().amax(-1)


@torch.no_grad()
def judge(images: Tensor, captions: Sequence[str], settings: JudgeSettings | None = None) -> Judgement:
    """Judge [B, 3, H, W] images in [0, 1] against their captions (what was asked). See the module docstring."""
    s = settings or JudgeSettings()
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"artifacts.judge: images have shape {tuple(images.shape)}, expected [B, 3, H, W] in [0, 1]")
    if len(captions) != images.shape[0]:
        raise ValueError(f"artifacts.judge: {images.shape[0]} images but {len(captions)} captions; pass one per image")
    parsed = [parse_caption(c) for c in captions]
    x = images.detach().float().cpu().clamp(0, 1)
    b, _, h, w = x.shape
    palette = COLOUR_RGB.to(x)

    # palette pixels and their colour
    dist = (x[:, None] - palette[None, :, :, None, None]).abs().amax(2)  # [B, 6, H, W]
    pal_d, pal_id = dist.min(1)
    is_pal = pal_d < s.palette_tol
    chroma = x.amax(1) - x.amin(1)
    bg = fit_background(x, (chroma < s.grey_chroma) & ~is_pal, s.stripe_contrast)

    reasons = {r: torch.zeros(b, dtype=torch.long) for r in REASONS}
    flagged = torch.zeros(b, h, w, dtype=torch.bool)
    odd_pixels = torch.zeros(b, dtype=torch.long)
    blobs = torch.zeros(b, h, w, dtype=torch.bool)

    # palette groups by colour: objects (>= min_object pixels) and fragments (smaller)
    obj_px = torch.zeros(b, h, w, dtype=torch.bool)
    frag_px = torch.zeros(b, h, w, dtype=torch.bool)
    for c, name in enumerate(COLOURS):
        named = torch.tensor([sum(col == name for col, _ in p.objects) for p in parsed])
        inv, counts, img = _blob_table(components(is_pal & (pal_id == c)))
        if not counts.numel():
            continue
        inside = inv >= 0
        at = inv.clamp_min(0)
        is_obj = counts >= s.min_object
        obj_px |= inside & is_obj[at]
        unnamed = (named[img] == 0) & (counts >= s.min_blob)
        frag_px |= inside & (~is_obj & ~unnamed)[at]
        reasons["unnamed_colour"].index_add_(0, img[unnamed], torch.ones(int(unnamed.sum()), dtype=torch.long))
        flagged |= inside & unnamed[at]
        n_obj = torch.zeros(b, dtype=torch.long).index_add_(0, img, is_obj.long())
        extra = (n_obj - named).clamp_min(0) * (named > 0)
        reasons["extra_object"] += extra
        flagged |= inside & (extra[img] > 0)[at] & is_obj[at]  # every object of a colour that has too many

    res = x - bg.expected
    off_bg = res.abs().amax(1) > s.bg_tol
    # edge: a blend of the background (either stripe level) and the colour of a nearby object pixel, the rim
    # a sampler leaves around an object (fragments are no objects: a dim blob around a speck stays a smudge)
    nb_obj = _neighbours(obj_px[:, None].float())[:, :, 0] > 0  # [N, B, H, W]
    maybe = off_bg & ~is_pal & nb_obj.any(0)
    edge = torch.zeros_like(maybe)
    if bool(maybe.any()):  # only the few pixels beside an object are tested
        at = maybe.nonzero(as_tuple=True)
        nb_rgb = _neighbours(x).permute(1, 3, 4, 0, 2)[at]  # [P, N, 3]
        px = x.permute(0, 2, 3, 1)[at][:, None]  # [P, 1, 3]
        mix = torch.minimum(_mix_error(px, bg.expected.permute(0, 2, 3, 1)[at][:, None], nb_rgb),
                            _mix_error(px, bg.other.permute(0, 2, 3, 1)[at][:, None], nb_rgb))  # [P, N]
        edge[at] = (nb_obj.permute(1, 2, 3, 0)[at] & (mix < s.mix_tol)).any(1)
    # faint blobs: the residual averaged over the 3x3 pixels that are plain background by themselves
    keep = (~is_pal & ~off_bg).float()[:, None]
    num = F.avg_pool2d(res * keep, 3, stride=1, padding=1, count_include_pad=False)
    den = F.avg_pool2d(keep, 3, stride=1, padding=1, count_include_pad=False)
    faint = (num / den.clamp_min(1e-6)).abs().amax(1) > s.smooth_tol
    odd = (~is_pal & ~edge & (off_bg | faint)) | frag_px

    # odd blobs
    inv, counts, img = _blob_table(components(odd))
    if counts.numel():
        k = counts.numel()
        sel = inv >= 0
        idx = inv[sel]
        mean_chroma = torch.zeros(k).index_add_(0, idx, chroma[sel]) / counts
        # at the other stripe level: close to it and the two levels really differ there
        at_other = ((x - bg.other).abs().amax(1) < s.bg_tol) & ((bg.other - bg.expected).abs().amax(1) > s.bg_tol)
        share_other = torch.zeros(k).index_add_(0, idx, at_other[sel].float()) / counts
        big = counts >= s.min_blob
        kind = torch.where(mean_chroma > s.grey_chroma, 0, torch.where(share_other > 0.5, 2, 1))
        for code, name in ((0, "smudge"), (1, "ghost"), (2, "broken_stripe")):
            hit = big & (kind == code)
            reasons[name].index_add_(0, img[hit], torch.ones(int(hit.sum()), dtype=torch.long))
        odd_pixels.index_add_(0, img[big], counts[big])
        blobs = sel & big[inv.clamp_min(0)]
        flagged |= blobs

    # the background against the caption
    for i, p in enumerate(parsed):
        if p.background is None:
            continue
        want = float(BACKGROUND_GREY[BACKGROUNDS.index(p.background)])
        wrong_level = abs(float(bg.level[i]) - want) > s.level_tol
        stripes_unasked = bool(bg.striped[i]) and p.texture == "plain"
        reasons["background"][i] = int(wrong_level or stripes_unasked)

    artifact = torch.stack([reasons[r] > 0 for r in DEFECTS]).any(0)
    return Judgement(artifact, reasons, odd_pixels, flagged, blobs)
