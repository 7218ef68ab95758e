"""User-facing errors: one line, naming the key or file and what was expected.

The CLI turns any KeelError into `keel: error: <message>` and exit code 2, with no traceback.
Everything else is a bug and keeps its traceback.
"""


class KeelError(Exception):
    """Base of every error caused by the user's input rather than by keel."""


class ConfigError(KeelError):
    """A recipe key, type or value is wrong. The message starts with the dotted key."""


class DataError(KeelError):
    """A data file is missing, malformed or incompatible. The message names the file."""


class CheckpointError(KeelError):
    """A checkpoint is missing, incomplete or does not match the model."""


class MissingAssetError(KeelError):
    """A real corpus or model that keel fetches at setup time is not on this machine."""


class MissingExtraError(KeelError):
    """An optional dependency is not installed; the message names the pip extra."""
