"""Error classes. Each message says what to change."""


class ArvideoError(Exception):
    """Base class of every error arvideo raises on purpose."""


class ConfigError(ArvideoError, ValueError):
    """A setting is missing, unknown or out of range."""


class ModelFolderError(ArvideoError, FileNotFoundError):
    """A model folder is missing, incomplete or of an unknown layout."""


class PromptError(ArvideoError, ValueError):
    """A prompt cannot be parsed or encoded."""


class NonFiniteError(ArvideoError, FloatingPointError):
    """NaN or inf appeared in the latents; names the chunk and the step."""
