"""Exception types. Every error names the file, line, key or tensor it is about."""


class MsncError(Exception):
    """Base class of the project's errors."""


class ConfigError(MsncError, ValueError):
    """A config file or override is wrong: unknown key, wrong type, impossible value."""


class DataError(MsncError, ValueError):
    """Input data is malformed: the message names the file and line."""


class CheckpointError(MsncError, ValueError):
    """A checkpoint does not match the model: the message names each tensor."""


class FetchError(MsncError, RuntimeError):
    """Demo assets could not be fetched (offline, checksum mismatch, missing tool)."""
