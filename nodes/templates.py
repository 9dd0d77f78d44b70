"""Template thumbnails on every backend: serve example_workflows/<name>.jpg at the URL the frontend asks.

The frontend (1.27 to the newest) builds a custom-node template's thumbnail URL as
``/api/workflow_templates/<pack folder>/<name>.jpg``. ComfyUI 0.3.64 mounts the folder statically there;
newer backends answer that route from a handler that serves ``.json`` only (404 for anything else). A
route the pack adds at import comes before the core's in the route table, so registering ours for this
pack's folder makes the thumbnails reachable on both; where the static mount is first (0.3.64) it serves
the same file. Only names of files in example_workflows are served, nothing else.
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

EXAMPLES = "example_workflows"
_NAME = re.compile(r"[A-Za-z0-9_.\- ]+")
_REGISTERED = "_sae_concept_eraser_thumbnails"


def thumbnail_path(pack_dir: str, name: str) -> str | None:
    """example_workflows/<name>.jpg of the pack when it exists and the name is a plain file name, else None."""
    if not _NAME.fullmatch(name) or name.startswith("."):
        return None
    folder = os.path.join(pack_dir, EXAMPLES)
    path = os.path.join(folder, name + ".jpg")
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder) or not os.path.isfile(path):
        return None
    return path


def register_thumbnail_route(server, pack_dir: str) -> str | None:
    """Add GET /workflow_templates/<pack folder>/{name}.jpg to ``server.routes`` (the /api twin is made by
    ComfyUI). Returns the route path, or None when there is no server or it is registered already."""
    from aiohttp import web

    routes = getattr(server, "routes", None)
    if routes is None or getattr(server, _REGISTERED, False):
        return None
    module = os.path.basename(os.path.normpath(pack_dir))  # the name /workflow_templates lists the pack under
    route = f"/workflow_templates/{module}/{{name}}.jpg"

    @routes.get(route)
    async def sae_template_thumbnail(request):
        path = thumbnail_path(pack_dir, request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Content-Type": "image/jpeg"})

    setattr(server, _REGISTERED, True)
    logger.debug("template thumbnails served at %s", route)
    return route
