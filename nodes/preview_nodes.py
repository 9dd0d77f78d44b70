"""Mask Preview and Compare: what a run detected over the images, and branches side by side."""

from __future__ import annotations

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..sae_core.errors import SAEInputError
from .common import CATEGORY, DetectionsType
from .grid import compare_grid
from .masks import AGGREGATES, SHOW, normalise, overlay, parse_color, pick_step, recorded_maps, upscale
from .run_state import RunState
from .ui_payload import compare_payload, mask_step_payload


class MaskPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAEMaskPreview",
            display_name="Mask Preview",
            category=CATEGORY,
            description="Overlay the recorded detection mask or score map on the decoded image, for one step or "
                        "aggregated over steps; also outputs it as a MASK at image resolution.",
            is_output_node=True,
            inputs=[
                DetectionsType.Input("detections", tooltip="From Patch Replacer or SAE Steer (after sampling)."),
                io.Image.Input("images", tooltip="The decoded images of that sampling run (VAE Decode)."),
                io.Int.Input("step", default=-1, min=-1, max=10000,
                             tooltip="Sampling step to show (0 = first); -1 aggregates over all recorded steps."),
                io.Combo.Input("aggregate", options=list(AGGREGATES), default="max",
                               tooltip="With step -1: max = detected at any step, mean = share of steps, last = final step."),
                io.Combo.Input("branch", options=["cond", "uncond"], default="cond",
                               tooltip="CFG branch whose detections are shown."),
                io.Combo.Input("show", options=list(SHOW), default="mask",
                               tooltip="mask: detected patches; score: detection margin scaled to 0..1."),
                io.Float.Input("opacity", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="0 = the image unchanged, 1 = detected patches fully coloured."),
                io.String.Input("color", default="#ff2020", tooltip="Overlay colour as hex (#rrggbb)."),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The image with the overlay."),
                io.Mask.Output(display_name="MASK", tooltip="The map at image resolution (0..1), usable by mask nodes."),
            ],
        )

    @classmethod
    def execute(cls, detections: RunState, images, step: int, aggregate: str, branch: str, show: str,
                opacity: float, color: str) -> io.NodeOutput:
        rec = detections.recorder
        if rec is None or not rec.records:
            found = getattr(detections, "warnings", None)
            if found:
                raise SAEInputError(f"Mask Preview: {found[-1]}")
            raise SAEInputError(
                f"Mask Preview: {detections.label} recorded nothing; sample the patched model first (connect "
                "images decoded from that KSampler) and check start/end percent and branches"
            )
        n, h, w = images.shape[:3]
        maps, per_image = [], []
        for i in range(n):
            keys, m = recorded_maps(rec, show, branch, image=i)
            per_image.append((keys, normalise(m) if show == "score" else m))  # every step, for the scrubber
            one = pick_step(keys, m, step, aggregate)
            maps.append(normalise(one) if show == "score" else one)
        full = upscale(torch.stack(maps), h, w).to(images.device, torch.float32)
        out = overlay(images, full.to(images.dtype), parse_color(color), opacity)
        payload = mask_step_payload(images, per_image, parse_color(color), opacity, branch, show,
                                    folder_paths.get_temp_directory())
        return io.NodeOutput(out, full, ui={**ui.PreviewImage(out, cls=cls).as_dict(), **payload})


class Compare(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAECompare",
            display_name="Compare",
            category=CATEGORY,
            description="Side-by-side grid of two or three image branches with labels (e.g. original, PER, steering).",
            is_output_node=True,
            inputs=[
                io.Image.Input("image_a", tooltip="First branch; sets the grid height."),
                io.Image.Input("image_b", tooltip="Second branch."),
                io.Image.Input("image_c", optional=True, tooltip="Optional third branch."),
                io.String.Input("label_a", default="original", tooltip="Label above the first branch."),
                io.String.Input("label_b", default="PER", tooltip="Label above the second branch."),
                io.String.Input("label_c", default="steer",
                                tooltip="Label above the third branch; unused while image_c is not connected."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The labelled grid.")],
        )

    @classmethod
    def execute(cls, image_a, image_b, label_a: str, label_b: str, label_c: str, image_c=None) -> io.NodeOutput:
        imgs, labels = [image_a, image_b], [label_a, label_b]
        if image_c is not None:
            imgs.append(image_c)
            labels.append(label_c)
        grid = compare_grid(imgs, labels)
        payload = compare_payload(imgs, labels, folder_paths.get_temp_directory())  # for the slider
        return io.NodeOutput(grid, ui={**ui.PreviewImage(grid, cls=cls).as_dict(), **payload})
