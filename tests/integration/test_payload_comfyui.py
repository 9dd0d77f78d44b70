"""Mask Preview's and Compare's frontend payloads after a real ComfyUI sampling run: one mask PNG per recorded step
whose alpha is exactly the recorder's mask (times the opacity), files in ComfyUI's temp folder."""

import numpy as np
import torch
from PIL import Image
from test_nodes_comfyui import SD1_BLOCK, busy_latents, make_sae, models_dir, typed_detector  # noqa: F401
from tiny_unets import sample


def test_mask_preview_sends_every_recorded_step(pack, sd1, models_dir):  # noqa: F811
    import folder_paths

    ext = pack.nodes.extension
    _, key, d = SD1_BLOCK
    sae = make_sae(pack, d)
    ids = busy_latents(pack, sae, sd1.model, key, "sd1")
    m, dets = ext.PatchReplacer.execute(sd1.model, typed_detector(pack, sae, ids, padding=0), mode="random",
                                        target="output", seed=0, look_ahead=False).args
    sample(m, "sd1", batch=2, width=128, height=96, steps=4)
    images = torch.rand(2, 96, 128, 3, generator=torch.Generator().manual_seed(0))
    res = ext.MaskPreview.execute(dets, images, step=-1, aggregate="max", branch="cond", show="mask", opacity=0.6,
                                  color="#00ff00")
    ui = res.ui
    assert ui["images"] and len(ui["sae_mask_steps"]) == 2
    temp = folder_paths.get_temp_directory()
    for i, entry in enumerate(ui["sae_mask_steps"]):
        keys, masks = dets.recorder.masks("cond", i)
        assert entry["steps"] == list(keys) == [0, 1, 2, 3]
        assert entry["grid"] == list(masks.shape[1:]) and (entry["width"], entry["height"]) == (128, 96)
        base = np.asarray(Image.open(f"{temp}/{entry['base']['subfolder']}/{entry['base']['filename']}"))
        np.testing.assert_array_equal(base, (images[i].numpy() * 255).round().astype(np.uint8))
        for s, ref in enumerate(entry["masks"]):
            assert ref["type"] == "temp"
            rgba = np.asarray(Image.open(f"{temp}/{ref['subfolder']}/{ref['filename']}"))
            np.testing.assert_array_equal(rgba[..., 3], np.where(masks[s].numpy(), round(0.6 * 255), 0))
            assert (rgba[..., :3] == [0, 255, 0]).all()
        assert 0 < masks.float().mean() < 1  # the check above saw detected and undetected patches


def test_compare_sends_each_branch(pack, models_dir):  # noqa: F811
    import folder_paths

    ext = pack.nodes.extension
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(1, 40, 60, 3, generator=g), torch.rand(1, 40, 60, 3, generator=g)
    ui = ext.Compare.execute(a, b, label_a="before", label_b="after", label_c="unused").ui
    branches = ui["sae_compare"]
    assert [x["label"] for x in branches] == ["before", "after"]
    for x, img in zip(branches, (a, b), strict=True):
        got = np.asarray(Image.open(f"{folder_paths.get_temp_directory()}/{x['image']['filename']}"))
        np.testing.assert_array_equal(got, (img[0].numpy() * 255).round().astype(np.uint8))
