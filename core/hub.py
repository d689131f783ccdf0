"""Pretrained weights from a local path or the Hugging Face hub, failing at once, with the fix, when neither works.

A default model (the SD-VAE, DINOv2, CLIP text) is fetched from the hub the first time and read from the local hub
cache after that. On a machine without a network the libraries retry for half a minute and end with an error that
names neither the model nor the option that points at a local copy; `require_weights` says both in one line,
before any download is tried.
"""
import functools
import os
import socket
from urllib.parse import urlparse

from huggingface_hub import constants, try_to_load_from_cache


class WeightsUnavailable(FileNotFoundError):
    """Pretrained weights that are neither on this machine nor reachable; the message says how to point at a copy."""


@functools.lru_cache(maxsize=None)
def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of `url` answers a TCP connection within `timeout` seconds (once per process and host)."""
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
    except (OSError, TypeError):
        return False
    return True


def hub_reachable() -> bool:
    """Whether the hub can be asked for files: HF_HUB_OFFLINE unset and its host answering."""
    return not constants.HF_HUB_OFFLINE and reachable(constants.ENDPOINT)


def is_local_path(source: str) -> bool:
    return os.path.exists(os.path.expanduser(source))


def in_hub_cache(repo_id: str, filename: str = "config.json") -> bool:
    """Whether the local hub cache holds `filename` of `repo_id` (a hub id, not a path)."""
    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError:  # not a valid repo id
        return False


def require_weights(source: str, what: str, how: str, filename: str = "config.json") -> None:
    """Return when `source` (a local path or a hub id) can be loaded: the path exists, the hub cache holds it, or
    the hub can be reached. Else raise WeightsUnavailable: "<what> <source> is not on this machine and the hub
    cannot be reached; <how>" (how: the option that points at a local copy)."""
    if is_local_path(source) or in_hub_cache(source, filename) or hub_reachable():
        return
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no network"
    raise WeightsUnavailable(f"{what} {source!r} is not on this machine and the hub cannot be reached ({why}); "
                             f"download it where there is a network (`hf download {source} --local-dir DIR`) and {how}")
