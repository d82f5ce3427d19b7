"""Deployment: MindIR export with a reload check (`mindir`), MindSpore Lite converter files (`lite`), `msnc export`
(`commands`).

The error type lives here, not in `mindir`, so the light modules (`lite`, `commands`) can raise it without
importing MindSpore; `mindir` re-exports it.
"""
from ms_nlp_compress.errors import MsncError


class ExportError(MsncError, RuntimeError):
    """An export could not be written, or the written file does not reproduce the model. Names the file."""
