"""SAE Concept Eraser core: sparse autoencoders on diffusion-UNet activations, without ComfyUI."""

from . import errors as _errors
from .config import SAEConfig
from .errors import *  # noqa: F403 - every exception type of the pack, importable as sae_core.<Name>
from .sae import NormState, SAEOutput, SAEWeights, SparseAutoencoder, TopKCodes

__all__ = [
    "NormState",
    "SAEConfig",
    "SAEOutput",
    "SAEWeights",
    "SparseAutoencoder",
    "TopKCodes",
    *_errors.__all__,
]

from .formats import detect_format, load_sae, save_native  # noqa: E402

__all__ += ["detect_format", "load_sae", "save_native"]
