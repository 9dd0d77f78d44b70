"""The planted-concept set used across the tests: re-exported from sae_core.synthetic (the demo uses it too)."""

from sae_core.synthetic import (  # noqa: F401
    AMP_HIGH,
    AMP_LOW,
    Planted,
    coverage_regions,
    direction,
    orthogonal,
    planted_maps,
    planted_sae,
    regions,
)
