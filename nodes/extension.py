"""ComfyUI V3 nodes of SAE Concept Eraser (placeholder while the nodes are written)."""
from comfy_api.latest import ComfyExtension, io


class SAEExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


async def comfy_entrypoint() -> SAEExtension:
    return SAEExtension()
