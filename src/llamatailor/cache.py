"""Where llamatailor keeps files shared by runs: converted models and build artifacts."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$LLAMATAILOR_CACHE`, else `$XDG_CACHE_HOME/llamatailor`, else `~/.cache/llamatailor`."""
    explicit = os.environ.get("LLAMATAILOR_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llamatailor"
