"""ComfyUI glue of SAE Concept Eraser: node schemas (extension.py) and the small pure modules they use."""
