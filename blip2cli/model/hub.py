"""Hugging Face hub ids: what looks like one, and the snapshot download behind every `--model` hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

from blip2cli.errors import UsageError
from blip2cli.model.weights import checkpoint_files

KNOWN_HUB_IDS = (
    "Salesforce/blip2-opt-2.7b", "Salesforce/blip2-opt-6.7b", "Salesforce/blip2-opt-2.7b-coco",
    "Salesforce/blip2-opt-6.7b-coco", "Salesforce/blip2-flan-t5-xl", "Salesforce/blip2-flan-t5-xl-coco",
    "Salesforce/blip2-flan-t5-xxl", "Salesforce/blip2-itm-vit-g", "Salesforce/blip2-itm-vit-g-coco",
)


def looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith((".", "/"))


def download(repo_id: str) -> Path:
    """Snapshot a hub repo into the standard cache (progress bars from huggingface_hub); honours HF_HUB_OFFLINE.
    safetensors are preferred; .bin weights are fetched only for repos without them."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not checkpoint_files(directory):
            directory = Path(snapshot_download(repo_id, allow_patterns=patterns + ["*.bin"]))
        return directory
    except RepositoryNotFoundError:
        known = "\n  ".join(KNOWN_HUB_IDS)
        raise UsageError(f"unknown model {repo_id!r}: not a local path and not on the Hugging Face hub. "
                         f"Official BLIP-2 models:\n  {known}") from None
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        known = "" if repo_id in KNOWN_HUB_IDS else " Official BLIP-2 models: " + ", ".join(KNOWN_HUB_IDS) + "."
        raise UsageError(
            f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached{offline}. "
            f"Download it once online (`hf download {repo_id}`) or pass a local directory.{known}"
        ) from None
