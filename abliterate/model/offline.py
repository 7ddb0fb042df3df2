"""Whether the Hugging Face hub answers, checked once and quickly, and working from the caches when it does not.

Without this, a run that is offline spends about a minute in huggingface_hub's and datasets' retries (five per
file, with backoff) before the error, and prints a warning per retry. `edit` asks once, before the stages that
need the hub (the evaluation's lm-eval data and judge models): if the hub is unreachable, both libraries are put
in offline mode, so cached files still work and a missing one fails at once, in one line.
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

log = logging.getLogger(__name__)

OFFLINE_HINT = "--tasks abliterate_mini_mc (offline) or --tasks none, or --no-eval, need no hub"


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub endpoint (HF_ENDPOINT) accepts a TCP connection; False offline or in HF_HUB_OFFLINE mode."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def work_offline() -> None:
    """From now on, huggingface_hub and datasets use their caches only: no requests, no retries."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config as datasets_config
    except ImportError:
        return
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(datasets_config, name):
            setattr(datasets_config, name, True)


def offline_unless_reachable() -> bool:
    """Check the hub once; offline mode (and one log line) if it is unreachable. Returns whether it is reachable."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if hub_reachable():
        return True
    log.info("the Hugging Face hub is unreachable: working from the local caches only (%s)", OFFLINE_HINT)
    work_offline()
    return False
