"""ComfyUI glue of SAE Concept Eraser: the nodes (one family per *_nodes.py, registered in extension.py) and the
small modules they share."""
