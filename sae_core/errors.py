"""Exception types of the core; every message names the file or key, what was expected and what was found."""


class SAEError(Exception):
    """Base class for every error the core raises on purpose."""


class SAEConfigError(SAEError, ValueError):
    """A configuration value is missing, unknown or inconsistent."""


class SAEFormatError(SAEError, ValueError):
    """A checkpoint's files or layout are missing, unreadable or not of a known format."""


class SAEShapeError(SAEFormatError):
    """A tensor's shape does not fit the configuration or another tensor."""


class SAENonFiniteError(SAEFormatError):
    """A tensor holds NaN or inf values."""


class UnsafeCheckpointError(SAEFormatError):
    """A pickled file holds objects that safe (weights_only) loading refuses."""
