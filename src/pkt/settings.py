"""Where pkt keeps things: the model cache (``PKT_HOME``) and the data directory (``PKT_DATA_DIR``).

Both are environment settings so that CI, notebooks and the CLI agree without passing paths around.
Nothing here touches the network.
"""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir

from pkt.errors import DataError

ENV_HOME = "PKT_HOME"
ENV_DATA = "PKT_DATA_DIR"


def pkt_home() -> Path:
    """Root of pkt's cache (prepared models, run caches); default: the user's cache dir."""
    root = os.environ.get(ENV_HOME)
    return Path(root).expanduser() if root else Path(user_cache_dir("pkt"))


def data_dir(required: bool = True) -> Path | None:
    """The local data directory (layout: gsm8k/, mmlu/, mbpp/, pkt_splits/), or None when unset.

    When ``required`` is false and the variable is unset, callers fall back to the Hugging Face hub.
    A variable that is set but points nowhere is always an error: silently going online would hide a typo.
    """
    raw = os.environ.get(ENV_DATA)
    if not raw:
        if required:
            raise DataError(f"{ENV_DATA} is not set: point it at the data directory (gsm8k/, mmlu/, mbpp/, pkt_splits/)")
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise DataError(f"{ENV_DATA}={raw}: no such directory")
    return path
