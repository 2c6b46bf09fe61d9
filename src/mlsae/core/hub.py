"""Whether the Hugging Face hub can be reached now (a quick TCP connect), so that a model or SAE
not found locally fails fast instead of hanging on huggingface_hub's retries."""

from __future__ import annotations

import os


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP connect to the HF endpoint (HF_ENDPOINT or huggingface.co:443)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False
