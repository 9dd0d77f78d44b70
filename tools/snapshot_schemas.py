"""Write tests/data/node_schemas.json: the /object_info schemas of this pack's nodes and the core nodes the
example workflows use, read from a real ComfyUI (started here on 127.0.0.1 with the pack linked in).

    COMFYUI_PATH=<ComfyUI checkout> <ComfyUI venv>/bin/python tools/snapshot_schemas.py

tests/integration/test_workflows_comfyui.py fails when the stored snapshot and the live schemas differ.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from comfy_server import comfy_server, comfyui_path, get_json  # noqa: E402
from workflow_format import SNAPSHOT, snapshot_schemas  # noqa: E402

OUR_NODES = ("SAELoad", "SAEConceptDetector", "SAEPatchReplacer", "SAESteer", "SAEMaskPreview", "SAELearnConcept",
             "SAESaveConcept", "SAELoadConcept", "SAECompare", "SAECollectActivations", "SAETrainSAE")
CORE_NODES = ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage",
              "PreviewImage")


def render(schemas: dict) -> str:
    return json.dumps(schemas, indent=1, sort_keys=True) + "\n"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfy = comfyui_path()
    if comfy is None:
        logging.error("no ComfyUI checkout: set COMFYUI_PATH")
        return 2
    with tempfile.TemporaryDirectory() as base, comfy_server(pathlib.Path(base), sys.executable, comfy) as url:
        info = get_json(url + "/object_info", timeout=60)
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(render(snapshot_schemas(info, OUR_NODES + CORE_NODES)))
    logging.info("wrote %s", SNAPSHOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
