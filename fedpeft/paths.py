"""Where fedpeft looks for shared data and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The folder of ready datasets: $FEDPEFT_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("FEDPEFT_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def cache_dir() -> Path:
    """Tokenisation and activation caches: $FEDPEFT_CACHE, else .cache/ in the checkout."""
    env = os.environ.get("FEDPEFT_CACHE")
    path = Path(env) if env else REPO_ROOT / ".cache"
    path.mkdir(parents=True, exist_ok=True)
    return path
