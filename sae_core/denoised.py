"""PER on the sampler's denoised prediction: at every step of look-ahead's pass 2, the cells pass 2 edits are copied,
in the predicted clean image (latent or pixels), from background cells, so the hole stays background to the end.

Why: replacing patch embeddings at one block tells the model "background here", but the sampler's own state keeps
the object's outline: the skip connections after the block and the next steps' input carry it, and the model
redraws a colourless object (the grey or muddy "ghost" blobs of Shapes world). Filling the block's features with
the features of a run whose prompt lacks the object does erase cleanly, so the fill's content is what matters, not
the place. The denoised prediction is where the sampler reads the picture from: a DDIM/Euler step moves the
sample towards it, and a prediction whose hole shows background leaves x_t's noise in the hole consistent with it
(``eps`` is recomputed from the actual sample). Stopping the fill before the last steps brings the ghost back, so
it runs to the end.

The cells filled are the guide's and, from the step the block edit first empties them, every cell pass 2 edits
beyond it (the live detector's finds: the model redraws the object next to the guide's hole, or a part the guide
missed), so the fill covers the block's whole hole; a hole at the block left unfilled in the prediction grows a
ghost. Cells where pass 1's picture showed another object (salient at the block, outside the guide) are never added:
a neighbour the target's colour or shape migrates onto is left to the block edit, not painted over.

The sources come from pass 1's last denoised prediction (the picture as it would have come out): cells outside the
cells to fill whose block patch was not salient at pass 1's last step (no other object is copied in), the nearest
along the picture's texture direction (stripes run on through the hole). They are drawn again only when pass 2
edits a new cell, so the fill does not flicker between steps. The values copied are pass 1's at the sources too
(``ReplaceSettings.fill_values`` "first_pass"): pass 2 may draw the object onto a source cell, and copying pass 2's
prediction there would carry it across the hole, row after row, as a bar; "current" copies pass 2's prediction at
the sources, as the fill did before (to reproduce earlier numbers). A cell is the block's
patch in the denoised tensor's resolution (a 16x16 block over a 32x32 picture: 2x2 pixels; SD's 64x64 latent under
a 16x16 block: 4x4 latent pixels); sizes that do not divide are mapped to the nearest cell.

With ``ReplaceSettings.hole`` "object" (the default) the fill empties the detected cells (the guide's cells eroded by
the detector's padding) and, in the padding, only the pixels of pass 1's picture that hold the detected object
(``object_pixels``); the rest of the padding counts as outside the hole, so a neighbour there keeps its pixels.
"cells" empties every pixel of the cells to fill.

With ``ReplaceSettings.keep_rest`` "all" (the default) every pixel outside the cells to fill takes pass 1's prediction
of the same model call (pass 2 calls the model exactly as pass 1 did), so the sampled picture is the unedited one
outside the hole: the model cannot redraw a neighbour in the erased object's shape, lose or move it, or draw the
object again beside the hole. "objects" keeps only the cells where pass 1's picture showed another object (salient
at the block, outside the cells to fill); "off" keeps nothing. Pass 1 then stores its prediction of every call.

Hosts: ComfyUI passes the CFG-combined denoised tensor (``sampler_post_cfg_function``); diffusers-style loops call
``fill_model_output`` (epsilon, v or sample prediction with the scheduler's alphas_cumprod, or a flow-matching
velocity with its sigma) or ``patch_scheduler``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .errors import SAEInputError
from .replace import SALIENT, texture_sources

logger = logging.getLogger(__name__)

PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
HOLE_TOLERANCE = 1.0
"""``object_pixels``: how near (in per-channel standard deviations of the picture) a pixel's value must be to one of
the detected object's to belong to it, and how far a seed must be from the background. Measured on the Shapes world
(see the README, "The object's pixels, not whole cells")."""


def cell_sources(final: Tensor, mask: Tensor, salience: Tensor | None = None) -> Tensor | None:
    """Flat source index per pixel of final [C, H, W] (identity outside the hole) for the hole ``mask`` [h, w]
    bool (the block's grid), or None when nothing is masked or no cell outside the hole is finite.

    Each masked cell takes the cell ``texture_sources`` picks among the unmasked finite cells of ``final`` that are
    not salient (``salience`` [h, w], the block's ``patch_salience``: below SALIENT; all unmasked finite cells when
    none is given or every one is salient), so no other object is copied in; its pixels come from the same offsets
    inside the source cell."""
    C, H, W = final.shape
    m = mask.to("cpu", torch.bool)
    if not bool(m.any()):
        return None
    if m.shape[0] > H or m.shape[1] > W:  # a grid finer than the prediction: its cells are whole pixels
        if salience is not None and salience.shape == mask.shape:
            salience = _coarse(salience, H, W)
        m = _coarse(m, H, W) > 0
    h, w = m.shape
    fy, fx = max(1, round(H / h)), max(1, round(W / w))
    grid = F.interpolate(final[None].float().cpu(), size=(h * fy, w * fx), mode="nearest")[0]
    cells = rearrange(grid, "c (h i) (w j) -> h w (c i j)", i=fy, j=fx)
    usable = ~m & torch.isfinite(cells).all(-1)
    if salience is not None and tuple(salience.shape) == (h, w):
        calm = usable & (salience.to("cpu", torch.float32) < SALIENT)
        usable = calm if bool(calm.any()) else usable
    if not bool(usable.any()):
        return None
    dst = torch.nonzero(m.reshape(-1)).flatten()
    src = texture_sources(dst, cells, usable)
    # cell offsets (dy, dx) per masked cell, applied to each of its pixels
    src_of = torch.arange(h * w)
    src_of[dst] = src  # the source cell of every cell (itself outside the hole)
    ys, xs = torch.arange(H), torch.arange(W)
    cy, cx = _pixel_cells(h, w, H, W)
    y0, x0 = _first_pixel(h, H), _first_pixel(w, W)  # [h + 1], [w + 1]: where each cell's pixels start
    cell = cy[:, None] * w + cx[None, :]  # [H, W]
    hole = m.reshape(-1)[cell]
    s_cell = src_of[cell]
    s_y, s_x = s_cell // w, s_cell % w
    # the same place inside the source cell (cells of unequal size: the nearest pixel of the source cell)
    sy = torch.minimum(y0[s_y] + (ys[:, None] - y0[cy][:, None]), y0[s_y + 1] - 1)
    sx = torch.minimum(x0[s_x] + (xs[None, :] - x0[cx][None, :]), x0[s_x + 1] - 1)
    ident = ys[:, None] * W + xs[None, :]
    return torch.where(hole, sy * W + sx, ident).reshape(-1)


def _coarse(t: Tensor, H: int, W: int) -> Tensor:
    """``t`` [h, w] as float on the host, max-pooled to at most the prediction's [H, W] (a finer grid's cells
    become whole pixels: a pixel takes the largest value of the cells it holds)."""
    t = t.float().cpu()
    if t.shape[0] <= H and t.shape[1] <= W:
        return t
    return F.adaptive_max_pool2d(t[None, None], (min(t.shape[0], H), min(t.shape[1], W)))[0, 0]


def _pixel_cells(h: int, w: int, H: int, W: int) -> tuple[Tensor, Tensor]:
    """The cell row of each of the H pixel rows and the cell column of each of the W pixel columns of an [h, w]
    grid over an [H, W] prediction (floor(pixel * cells / pixels))."""
    return (torch.clamp((torch.arange(H) * h) // H, max=h - 1), torch.clamp((torch.arange(W) * w) // W, max=w - 1))


def _first_pixel(cells: int, pixels: int) -> Tensor:
    """[cells + 1]: the first pixel whose cell (pixel * cells // pixels) is c, for c = 0 .. cells (pixels at the end)."""
    c = torch.arange(cells + 1)
    return torch.clamp(-((-c * pixels) // cells), max=pixels)


class DenoisedFill:
    """The denoised-prediction fill of the look-ahead interventions whose ReplaceSettings ask for it.

    Call it with every denoised prediction of both passes (images [B, C, H, W], the batch in the order of the
    interventions' image indices): pass 1 keeps the latest (the picture as it would come out), pass 2 returns the
    prediction with the cells to fill (``fill_masks``) copied from background cells (pass 1's values there, or pass
    2's with ``fill_values="current"``); otherwise it returns its input."""

    def __init__(self, interventions: Iterable):
        self.interventions = [iv for iv in interventions if _wants_fill(iv)]

    def __bool__(self) -> bool:
        return bool(self.interventions)

    def __call__(self, denoised: Tensor) -> Tensor:
        """denoised [B, C, H, W], or packed tokens [B, N, D] whose N is the guide's grid (diffusers' FLUX
        latents: one token per cell), are left as they are where nothing is filled."""
        out = denoised
        if denoised.ndim not in (3, 4):
            return out
        for iv in self.interventions:
            memory = iv.fill_memory  # lives on the intervention: the two passes may be two host calls
            keep = getattr(iv.edit, "keep_rest", "off")
            if iv.phase == "detect":  # (begin_detect_pass emptied the memory; the block adds its codes to it)
                memory["final"] = denoised.detach().clone()
                if keep != "off":
                    memory.setdefault("trace", []).append(memory["final"])
                continue
            if iv.phase != "edit" or iv.guide is None or not iv.guide.masks:
                continue
            call = memory.get("call", 0)  # pass 2's call k matches pass 1's call k (keep_rest)
            memory["call"] = call + 1
            grid = out
            if out.ndim == 3:  # tokens: a map of the guide's grid, one token per cell
                h, w = next(iter(iv.guide.masks.values())).shape
                if out.shape[1] != h * w:
                    continue
                grid = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)
            plan = _plan(iv, memory, grid)
            if plan is None:
                continue
            flat = grid.flatten(2)
            rows = []
            for b, p in enumerate(plan):
                if p is None:
                    rows.append(flat[b])
                elif p[1] is None:  # "current": pass 2's prediction at the sources
                    rows.append(flat[b].index_select(-1, p[0]))
                else:  # pass 1's values on the moved pixels; every other pixel exactly as predicted
                    rows.append(torch.where(p[0], p[1], flat[b]))
            filled = torch.stack(rows)
            if keep != "off":  # the rest of the picture as pass 1 (the unedited sampling) predicts it
                filled = _keep_rest(iv, memory, filled, keep, call)
            out = filled.transpose(1, 2) if out.ndim == 3 else filled.view_as(out)
        return out

    def fill_model_output(self, model_output: Tensor, sample: Tensor, alpha_bar: float | Tensor | None = None,
                          prediction_type: str = "epsilon", sigma: float | Tensor | None = None) -> Tensor:
        """The model output of a diffusers-style step whose denoised prediction has been filled; unchanged outside
        pass 2. epsilon, v_prediction, sample: at cumulative alpha ``alpha_bar``; flow (rectified flow, FLUX /
        SD3: x_t = (1 - sigma) x0 + sigma noise, output noise - x0): at ``sigma``."""
        if prediction_type not in PREDICTIONS:
            raise SAEInputError(f"DenoisedFill: prediction_type is {prediction_type!r}, expected one of "
                                f"{list(PREDICTIONS)}")
        need = "sigma" if prediction_type == "flow" else "alpha_bar"
        if (sigma if prediction_type == "flow" else alpha_bar) is None:
            raise SAEInputError(f"DenoisedFill: prediction_type {prediction_type!r} needs {need}")
        if not self.interventions:
            return model_output
        x, o = sample.float(), model_output.float()
        if prediction_type == "flow":
            sg = torch.as_tensor(sigma, dtype=torch.float32).to(sample.device)
            x0 = x - sg * o
        else:
            a = torch.as_tensor(alpha_bar, dtype=torch.float32).to(sample.device)
            sa, sb = a.sqrt(), (1 - a).sqrt()
            if prediction_type == "epsilon":
                x0 = (x - sb * o) / sa
            elif prediction_type == "v_prediction":
                x0 = sa * x - sb * o
            else:
                x0 = o
        new = self(x0)
        if new is x0:
            return model_output
        if prediction_type == "flow":
            res = (x - new) / sg
        elif prediction_type == "epsilon":
            res = (x - sa * new) / sb
        elif prediction_type == "v_prediction":
            eps = (x - sa * new) / sb
            res = sa * eps - sb * new
        else:
            res = new
        # only the filled values change: elsewhere the output stays bit-identical (no round trip through x0)
        return torch.where(new != x0, res.to(model_output.dtype), model_output)

    @contextmanager
    def patch_scheduler(self, scheduler) -> Iterator[None]:
        """Within the block, ``scheduler.step(model_output, timestep, sample, ...)`` fills the denoised prediction
        first; restored on exit, also on errors. Schedulers with ``alphas_cumprod`` (DDIM, DDPM, PNDM, ...; their
        config's prediction_type) and flow-matching Euler (``FlowMatchEulerDiscreteScheduler``: FLUX, SD3; its
        sigma at the step, packed FLUX latents included)."""
        if not self.interventions:
            yield
            return
        ac = getattr(scheduler, "alphas_cumprod", None)
        flow = ac is None and hasattr(scheduler, "sigmas") and hasattr(scheduler, "index_for_timestep")
        if ac is None and not flow:
            raise SAEInputError(
                f"DenoisedFill: scheduler {type(scheduler).__name__} has neither alphas_cumprod nor flow-matching "
                "sigmas; the denoised fill wraps DDIM / DDPM / PNDM-like and FlowMatchEulerDiscrete schedulers; "
                "call fill_model_output (or the fill on the denoised prediction) from your own loop")
        pred = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
        original = scheduler.step

        def step(model_output, timestep, sample, *args, **kwargs):
            if flow:
                i = scheduler.step_index
                if i is None:
                    i = scheduler.index_for_timestep(timestep)
                filled = self.fill_model_output(model_output, sample, prediction_type="flow", sigma=scheduler.sigmas[i])
            else:
                filled = self.fill_model_output(model_output, sample, ac[int(timestep)], pred)
            return original(filled, timestep, sample, *args, **kwargs)

        scheduler.step = step
        try:
            yield
        finally:
            try:
                del scheduler.step
            except AttributeError:
                scheduler.step = original


def fill_masks(guide: Tensor, edited: Tensor | None, salience: Tensor | None) -> Tensor:
    """The cells the fill empties, [h, w] bool: the guide's, and every cell pass 2 has edited since (the live
    detector's finds: an object the model redraws next to the guide's hole), except those where pass 1's picture
    showed another object (``salience`` at or above SALIENT outside the guide): a neighbour the target's colour
    or shape migrates onto is left to the block edit, never painted over with background."""
    if edited is None or edited.shape != guide.shape:
        return guide
    extra = edited.to(guide.device) & ~guide
    if salience is not None and salience.shape == guide.shape:
        extra = extra & (salience.to(guide.device) < SALIENT)
    return guide | extra


def _plan(iv, memory: dict, grid: Tensor) -> list[tuple[Tensor, Tensor | None] | None] | None:
    """Per image what pass 2's fill writes into ``grid`` [B, C, H, W] (None: left alone), on its device and dtype:
    ``(source index [H*W], None)`` to copy the prediction itself at the sources ("current"), or ``(moved [H*W] bool,
    values [C, H*W])``, pass 1's picture at the sources of the pixels that move ("first_pass"). Built once per
    draw of sources, so a step neither copies from the host nor gathers pass 1's picture again."""
    idx = _sources(iv, memory, grid)
    if idx is None:
        return None
    how = getattr(iv.edit, "fill_values", "first_pass")
    drawn, at = memory["sources"], (how, grid.device, grid.dtype)
    hit = memory.get("plan")
    if hit is not None and hit[0] is drawn and hit[1] == at:
        return hit[2]
    final = memory["source_grid"].flatten(2)
    plan: list[tuple[Tensor, Tensor | None] | None] = []
    for b, i in enumerate(idx):
        if i is None:
            plan.append(None)
            continue
        i = i.to(grid.device)
        if how == "current":
            plan.append((i, None))
            continue
        # identity outside the cells to fill (cell_sources), so the moved pixels are exactly the hole's
        moved = i != torch.arange(i.numel(), device=grid.device)
        plan.append((moved, final[b].index_select(-1, i.to(final.device)).to(grid.device, grid.dtype)))
    memory["plan"] = (drawn, at, plan)
    return plan


def _sources(iv, memory: dict, denoised: Tensor) -> list[Tensor | None] | None:
    """Per image the flat source index of every pixel (None: left alone), drawn from pass 1's picture and salience
    for pass 2's cells to fill; drawn again only when pass 2 edits a new cell (a fill that moves between steps
    blurs, so sources never move otherwise)."""
    B = denoised.shape[0]
    edited = iv.fill_edited() if hasattr(iv, "fill_edited") else {}
    key = (B, tuple(denoised.shape[-2:]), memory.get("edited_version", 0))
    hit = memory.get("sources")
    if hit is not None and hit[0] == key:
        return hit[1]
    final = memory.get("final")
    if final is not None and final.ndim == 3 and denoised.ndim == 4 and final.numel() == denoised.numel():
        final = final.transpose(1, 2).reshape(denoised.shape)  # packed tokens of pass 1, as the grid of pass 2
    if final is None or final.shape != denoised.shape:
        if memory.get("warned") != key[:2]:  # once per shape, not at every new edited cell
            memory["warned"] = key[:2]
            logger.warning("%s: pass 1 left no denoised prediction of shape %s (found %s); the denoised fill is off "
                           "for this run", iv.label, tuple(denoised.shape), None if final is None else tuple(final.shape))
        memory["sources"] = (key, None)
        return None
    hw = tuple(next(iter(iv.guide.masks.values())).shape)
    masks, present = iv.guide.rows(list(range(B)), hw, "cpu")
    sal = iv.fill_salience() if hasattr(iv, "fill_salience") else {}
    by_object = getattr(iv.edit, "hole", "cells") == "object"
    padding = int(getattr(getattr(getattr(iv, "detector", None), "settings", None), "padding", 0))
    idx: list[Tensor | None] = []
    holes: dict[int, Tensor] = {}  # per image the pixels the fill empties, where only the object's are (hole "object")
    for b in range(B):
        if not bool(present[b]):
            idx.append(None)
            continue
        cells = fill_masks(masks[b], edited.get(b), sal.get(b))
        i = cell_sources(final[b], cells, sal.get(b))
        if i is not None and by_object:
            px = object_pixels(final[b], cells, sal.get(b), erode_cells(cells, padding))
            if px is not None:
                holes[b] = px
                i = torch.where(px, i, torch.arange(i.numel()))
        idx.append(i)
    idx = None if all(i is None for i in idx) else idx
    memory["holes"] = holes
    memory["sources"] = (key, idx)
    memory["source_grid"] = final  # pass 1's picture as pass 2's grid (packed tokens reshaped): first_pass copies it
    return idx


def erode_cells(cells: Tensor, padding: int) -> Tensor:
    """The cells [h, w] bool before a dilation by ``padding`` (a (2p+1)^2 square, as ``detect.dilate_mask``): those
    whose whole neighbourhood is in ``cells``, beyond the grid's edge counted in. ``cells`` itself when that leaves
    none (a mask that was not dilated)."""
    if padding <= 0:
        return cells
    m = cells.to("cpu", torch.bool)
    k = 2 * padding + 1
    core = ~(F.max_pool2d((~m).float()[None, None], k, stride=1, padding=padding)[0, 0] > 0)
    return core if bool(core.any()) else m


def object_pixels(final: Tensor, cells: Tensor, salience: Tensor | None = None, core: Tensor | None = None
                  ) -> Tensor | None:
    """[H*W] bool: the pixels of the cells to fill ``cells`` [h, w] that the fill empties: every pixel of the ``core``
    cells (the detected cells before padding; default: ``cells``), and in the rest (the padding) those that hold the
    detected object in pass 1's picture ``final`` [C, H, W]. None when no core pixel stands out from the background,
    and the fill then empties the whole cells. The detector's own cells are always emptied, so the rule can only give
    the padding back, never keep a detected part of the object.

    Values are compared in units of the picture's per-channel standard deviation. Background: the pixels outside the
    cells, of cells that are not salient (``salience`` [h, w] below SALIENT; every pixel outside when none is calm).
    Seeds: the core's pixels farther than HOLE_TOLERANCE from every background pixel. The object: the pixels connected
    (8 neighbours) to a seed through pixels within HOLE_TOLERANCE of some seed and nearer to a seed than to the
    background, grown by one pixel (an edge blends into the background), inside the cells. A neighbour inside the
    padding, in another colour, is not part of it and keeps its pixels."""
    C, H, W = final.shape
    hole = _cell_pixels(cells, H, W)
    core = _cell_pixels(cells if core is None else core, H, W) & hole
    values = final.reshape(C, -1).T.float().cpu()
    if not bool(core.any()) or not bool(torch.isfinite(values).all()):
        return None
    z = values / values.std(0).clamp_min(1e-6)
    background = ~hole
    if salience is not None and tuple(salience.shape) == tuple(cells.shape):
        calm = background & _cell_pixels(salience.float() < SALIENT, H, W)
        background = calm if bool(calm.any()) else background
    if not bool(background.any()):
        return None
    inside = hole.nonzero().flatten()  # distances only for the hole's pixels: the rest is never emptied
    to_background = torch.full((H * W,), float("inf"))
    to_background[inside] = torch.cdist(z[inside], _spread(z[background])).amin(1)
    seeds = core & (to_background > HOLE_TOLERANCE)
    if not bool(seeds.any()):
        return None
    to_seed = torch.full((H * W,), float("inf"))
    to_seed[inside] = torch.cdist(z[inside], _spread(z[seeds])).amin(1)
    like = ((to_seed < to_background) & (to_seed <= HOLE_TOLERANCE) & hole).view(1, H, W).float()
    grown = seeds.view(1, H, W).float()
    while True:  # the seeds' 8-connected components through object-like pixels
        nxt = F.max_pool2d(grown[None], 3, stride=1, padding=1)[0] * like
        nxt = torch.maximum(nxt, grown)
        if torch.equal(nxt, grown):
            break
        grown = nxt
    edge = F.max_pool2d(grown[None], 3, stride=1, padding=1)[0, 0] > 0
    return (edge.reshape(-1) | core) & hole


def _spread(points: Tensor, most: int = 2048) -> Tensor:
    """At most ``most`` of ``points`` [N, C], evenly spaced in their order (bounds the pairwise distances' memory)."""
    if points.shape[0] <= most:
        return points
    return points[torch.linspace(0, points.shape[0] - 1, most).round().long()]


def _cell_pixels(cells: Tensor, H: int, W: int) -> Tensor:
    """[H*W] bool: the pixels of a [H, W] prediction that lie in a true cell of ``cells`` [h, w] (the pixel-to-cell
    mapping of ``cell_sources``; a grid finer than the prediction: a pixel any of whose cells is true)."""
    m = _coarse(cells, H, W) > 0
    cy, cx = _pixel_cells(*m.shape, H, W)
    return m[cy[:, None], cx[None, :]].reshape(-1)


def _keep_rest(iv, memory: dict, flat: Tensor, how: str, k: int) -> Tensor:
    """``flat`` [B, C, H*W] (pass 2's filled prediction) with the kept pixels set to pass 1's prediction of the same
    call: pass 2 calls the model exactly as pass 1 did (same noise, same sampler, same steps), so its call ``k``
    takes pass 1's call k. Kept: every pixel outside the cells to fill ("all"), or those of the cells where pass
    1's picture showed another object ("objects": salient outside the guide and the cells to fill). Images without
    the concept, or a pass 2 that calls more often than pass 1 did, are left as they are."""
    trace = memory.get("trace", ())
    if k >= len(trace) or trace[k].numel() != flat.numel():
        return flat
    ref = trace[k]
    if ref.ndim == 3:  # packed tokens [B, N, D], as the grid's [B, D, N]
        ref = ref.transpose(1, 2)
    ref = ref.reshape(flat.shape).to(flat.device, flat.dtype)
    key = (memory.get("edited_version", 0), tuple(flat.shape), how)
    hit = memory.get("keep_rest")
    if hit is None or hit[0] != key:
        B = flat.shape[0]
        H, W = memory["source_grid"].shape[-2:]
        hw = tuple(next(iter(iv.guide.masks.values())).shape)
        masks, present = iv.guide.rows(list(range(B)), hw, "cpu")
        edited, sal = iv.fill_edited(), iv.fill_salience()
        keep = torch.zeros(B, 1, H * W, dtype=torch.bool)
        for b in range(B):
            if not bool(present[b]):
                continue
            hole = memory.get("holes", {}).get(b)
            if hole is None:
                hole = _cell_pixels(fill_masks(masks[b], edited.get(b), sal.get(b)), H, W)
            if how == "all":
                keep[b, 0] = ~hole
            elif sal.get(b) is not None and sal[b].shape == masks[b].shape:
                keep[b, 0] = _cell_pixels(sal[b] >= SALIENT, H, W) & ~hole  # (the guide's cells are in the hole)
        hit = (key, keep.to(flat.device))
        memory["keep_rest"] = hit
    return torch.where(hit[1], ref, flat)


def _wants_fill(iv) -> bool:
    edit = getattr(iv, "edit", None)
    return bool(getattr(edit, "denoised", False)) and getattr(iv, "lookahead", None) is not None
