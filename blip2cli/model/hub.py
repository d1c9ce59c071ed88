"""The Hugging Face hub: what looks like a hub id, and every download from it (the snapshot behind a `--model` hub
id, with `--revision` and `--cache-dir`, and the tokenizers and configs recipes name).

Before asking the hub, one connect to its endpoint (HF_ENDPOINT, through the proxy when one is set) with a short
timeout: when nothing answers, the cache is used as with HF_HUB_OFFLINE=1 and a file missing from it is one line
saying what to do, instead of huggingface_hub's "Retrying in 8s" lines (a minute) and a traceback.
"""

from __future__ import annotations

import functools
import re
import socket
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from blip2cli.errors import UsageError
from blip2cli.model.weights import checkpoint_files

KNOWN_HUB_IDS = (
    "Salesforce/blip2-opt-2.7b", "Salesforce/blip2-opt-6.7b", "Salesforce/blip2-opt-2.7b-coco",
    "Salesforce/blip2-opt-6.7b-coco", "Salesforce/blip2-flan-t5-xl", "Salesforce/blip2-flan-t5-xl-coco",
    "Salesforce/blip2-flan-t5-xxl", "Salesforce/blip2-itm-vit-g", "Salesforce/blip2-itm-vit-g-coco",
)
PROBE_TIMEOUT_S = 2.5  # a connect to huggingface.co takes well under a second where there is a network
MODEL_FIX = "pass a local folder to --model (or --cache-dir DIR where it is cached)"
T = TypeVar("T")


def looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith((".", "/"))


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    """True when the hub is not to be asked: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, or its endpoint
    does not take a connection within PROBE_TIMEOUT_S (probed once per process)."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or not _reachable(endpoint())


@functools.cache
def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):  # the proxy is what we connect to
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or "", via.port or 80
    connected = threading.Event()

    def connect() -> None:  # in a thread, so a name lookup that hangs is bounded by the timeout too
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            connected.set()
        except OSError:
            pass

    threading.Thread(target=connect, daemon=True).start()
    return connected.wait(PROBE_TIMEOUT_S + 0.1)


def not_reachable(repo_id: str, fix: str, revision: str | None = None, cache_dir: Path | str | None = None) -> str:
    """The one line for a hub repo that is neither in the cache nor reachable: why, and what to do."""
    from huggingface_hub import constants

    missing = (f"{repo_id}{f' at revision {revision}' if revision else ''} is not in the Hugging Face cache "
               f"({cache_dir or constants.HF_HUB_CACHE})")
    if constants.is_offline_mode():
        return (f"{missing} and HF_HUB_OFFLINE is set: {fix}, or download it once (without HF_HUB_OFFLINE, or "
                f"`hf download {repo_id}` on a machine online)")
    return (f"{missing} and the hub ({endpoint()}) cannot be reached: {fix}, or run `hf download {repo_id}` on a "
            "machine online and bring its cache (HF_HUB_CACHE), then HF_HUB_OFFLINE=1 reads only the cache")


def download(repo_id: str, *, revision: str | None = None, cache_dir: Path | str | None = None,
             weights: bool = True, fix: str = MODEL_FIX) -> Path:
    """A local snapshot of a hub repo, in the standard cache (HF_HUB_CACHE, HF_HOME) or `cache_dir`, at `revision`
    (a branch, tag or commit; default main), with huggingface_hub's progress bars. Config and tokenizer files,
    and with `weights` the safetensors (.bin only for repos without them). Offline (see `offline`), only the cache
    is read. `fix`: what to do instead, said when the repo is neither cached nor reachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )  # fmt: skip

    patterns = ["*.json", "*.txt", "*.model", "tokenizer*"] + (["*.safetensors"] if weights else [])
    local_only = offline()

    def snapshot(allow: list[str]) -> Path:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow,
                                      local_files_only=local_only))

    try:
        directory = snapshot(patterns)
        if weights and not checkpoint_files(directory):
            directory = snapshot(patterns + ["*.bin"])
        return directory
    except GatedRepoError:
        raise UsageError(f"{repo_id} is gated: accept its terms on the hub, then `hf auth login`") from None
    except RepositoryNotFoundError:
        known = "\n  ".join(KNOWN_HUB_IDS)
        raise UsageError(f"unknown model {repo_id!r}: not a local path and not on the Hugging Face hub. "
                         f"Official BLIP-2 models:\n  {known}") from None
    except RevisionNotFoundError:
        raise UsageError(f"--revision {revision}: no such branch, tag or commit in {repo_id}") from None
    except LocalEntryNotFoundError:
        known = "" if repo_id in KNOWN_HUB_IDS or not weights else (
            ". Official BLIP-2 models: " + ", ".join(KNOWN_HUB_IDS))
        raise UsageError(not_reachable(repo_id, fix, revision, cache_dir) + known) from None


def pretrained(load: Callable[..., T], source: str | Path, fix: str, **kwargs) -> T:
    """`load(source, **kwargs)`, a transformers `from_pretrained`, for a folder or a hub id; a hub id is read from
    the cache alone when the hub cannot be reached, and one that is not there is one line with `fix`."""
    if Path(source).exists():
        return load(str(source), **kwargs)
    local_only = offline()
    try:
        return load(str(source), local_files_only=local_only, **kwargs)
    except OSError:
        if local_only:
            raise UsageError(not_reachable(str(source), fix)) from None
        raise
