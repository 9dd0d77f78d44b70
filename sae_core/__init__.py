"""SAE Concept Eraser core: sparse autoencoders on diffusion-UNet activations, without ComfyUI."""
