"""SAE Concept Eraser core: sparse autoencoders on diffusion-UNet activations, without ComfyUI."""

from .config import SAEConfig
from .errors import (
    SAEConfigError,
    SAEError,
    SAEFormatError,
    SAENonFiniteError,
    SAEShapeError,
    UnsafeCheckpointError,
)
from .sae import NormState, SAEOutput, SAEWeights, SparseAutoencoder, TopKCodes

__all__ = [
    "NormState",
    "SAEConfig",
    "SAEConfigError",
    "SAEError",
    "SAEFormatError",
    "SAENonFiniteError",
    "SAEOutput",
    "SAEShapeError",
    "SAEWeights",
    "SparseAutoencoder",
    "TopKCodes",
    "UnsafeCheckpointError",
]

from .formats import detect_format, load_sae, save_native  # noqa: E402

__all__ += ["detect_format", "load_sae", "save_native"]
