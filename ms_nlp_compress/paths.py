"""Where cached assets live. Never inside the git tree."""
import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the asset cache: $MSNC_CACHE, else $XDG_CACHE_HOME/ms_nlp_compress, else ~/.cache/ms_nlp_compress."""
    env = os.environ.get("MSNC_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ms_nlp_compress"


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 teacher: model.safetensors, config.json, vocab.txt, tokenizer.json."""
    return cache_dir() / "minilm"
