"""What a bug report needs: versions, devices, Java (for the caption metrics)."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import subprocess
import sys

from blip2cli import __version__

PACKAGES = ("torch", "torchvision", "transformers", "timm", "accelerate", "tokenizers", "safetensors",
            "faiss-cpu", "faiss-gpu", "webdataset", "pycocoevalcap", "typer", "rich", "pillow", "numpy")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def java_version() -> str | None:
    """The first line of `java -version`, or None when no Java is on PATH."""
    java = shutil.which("java")
    if java is None:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stderr or out.stdout).strip().splitlines()
    match = re.search(r'version "([^"]+)"', text[0]) if text else None
    return match.group(1) if match else (text[0] if text else None)


def collect() -> dict[str, object]:
    """Everything `blip2 env` reports, as one flat-ish dict (also its --json record)."""
    info: dict[str, object] = {
        "blip2cli": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    for name in PACKAGES:
        version = package_version(name)
        if version is not None:
            info[name] = version
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["cuda"] = torch.version.cuda
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"]
        info["bf16_supported"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        info["mps_available"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        info["cpu_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    try:
        import faiss

        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    except ImportError:
        info["faiss_gpus"] = None
    info["java"] = java_version()
    info["hf_hub_offline"] = _env_flag("HF_HUB_OFFLINE")
    return info


def _env_flag(name: str) -> bool:
    import os

    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
