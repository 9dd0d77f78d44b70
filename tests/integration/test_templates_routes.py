"""Template thumbnails on the newer backend's route table, where /workflow_templates/{module}/{filename}
serves .json only: the pack's own route (registered at import, so earlier in the table) answers the .jpg.
The real 0.3.64 server is covered by test_workflows_comfyui.py (static mount)."""

import asyncio
import json
import pathlib

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAMES = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))


def newer_style_app(pack, pack_dir):
    """The newer server's order: custom nodes' routes (added at import), then the core's json-only template
    route, then every route again under /api."""
    server = type("Server", (), {"routes": web.RouteTableDef()})()
    route = pack.nodes.templates.register_thumbnail_route(server, str(pack_dir))
    assert pack.nodes.templates.register_thumbnail_route(server, str(pack_dir)) is None  # once only

    @server.routes.get("/workflow_templates/{module_name}/{filename}")
    async def core(request):  # the newer core handler: .json only
        filename = request.match_info["filename"]
        if not filename.endswith(".json"):
            raise web.HTTPNotFound()
        return web.FileResponse(pack_dir / "example_workflows" / filename)

    app = web.Application()
    api = web.RouteTableDef()
    for r in server.routes:
        api.route(r.method, "/api" + r.path)(r.handler, **r.kwargs)
    app.add_routes(api)
    app.add_routes(server.routes)
    return app, route


def test_thumbnails_and_json_reachable_on_the_newer_route_table(pack, tmp_path):
    pack_dir = tmp_path / "sae-concept-eraser"
    pack_dir.symlink_to(ROOT, target_is_directory=True)
    app, route = newer_style_app(pack, pack_dir)
    assert route == "/workflow_templates/sae-concept-eraser/{name}.jpg"

    async def go():
        async with TestClient(TestServer(app)) as client:
            for name in NAMES:
                r = await client.get(f"/api/workflow_templates/sae-concept-eraser/{name}.jpg")
                assert r.status == 200 and (await r.read())[:3] == b"\xff\xd8\xff", name
                assert r.headers["Content-Type"] == "image/jpeg"
                r = await client.get(f"/api/workflow_templates/sae-concept-eraser/{name}.json")
                assert r.status == 200 and json.loads(await r.read())["nodes"]
            for bad in ("missing", "..%2F__init__", ".hidden", "%2E%2E%2Fpyproject"):
                r = await client.get(f"/api/workflow_templates/sae-concept-eraser/{bad}.jpg")
                assert r.status == 404, bad
            r = await client.get("/api/workflow_templates/other-pack/x.jpg")  # other packs: the core's answer
            assert r.status == 404

    asyncio.run(go())
