"""What every result records about how it was produced: versions, git commit, hardware, seeds."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

TRACKED_PACKAGES = ("cpt_bench", "torch", "transformers", "lm_eval", "peft", "datasets", "safetensors", "gguf")
REPO_ROOT = Path(__file__).resolve().parents[1]


def package_versions() -> dict[str, str]:
    """Installed version of each package in ``TRACKED_PACKAGES`` (``"missing"`` when absent)."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def git_commit() -> dict[str, Any]:
    """Commit of the checkout this package runs from, and whether it had uncommitted changes."""

    def git(*args: str) -> str | None:  # None outside a checkout or without git; git's own errors are not shown
        try:
            done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def hardware() -> dict[str, Any]:
    """CPU, core count, torch threads and, when present, the CUDA device."""
    import torch

    record = {
        "host": platform.node(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        record["cuda_device"] = torch.cuda.get_device_name(0)
        record["cuda_version"] = torch.version.cuda
    return record


def environment_record(seeds: dict[str, int]) -> dict[str, Any]:
    """The provenance block stored with every result."""
    return {"versions": package_versions(), "git": git_commit(), "hardware": hardware(), "seeds": seeds,
            "argv": sys.argv}


def _linux_status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``: reported in kB) in bytes on Linux, else None."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int | None:
    """This process's resident set size now (Linux ``VmRSS``), None elsewhere."""
    return _linux_status_bytes("VmRSS")


def reset_peak_memory() -> None:
    """Start a new peak-memory window: CUDA's max-allocated counter and, on Linux, the peak RSS (VmHWM).

    Without a reset (other systems), ``peak_memory`` reports the peak since the process started.
    """
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")  # 5 = reset the peak RSS (Linux >= 4.0)
    except OSError:
        pass


def peak_memory() -> dict[str, Any]:
    """Peak memory of this process since the last ``reset_peak_memory`` (or its start): CUDA max allocated
    bytes on GPU, else the peak resident set size."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "peak_memory_kind": "cuda_max_allocated"}
    peak_bytes = _linux_status_bytes("VmHWM")  # since start or the last ``reset_peak_memory``
    if peak_bytes is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        peak_bytes = rss if sys.platform == "darwin" else rss * 1024
    return {"peak_memory_bytes": int(peak_bytes), "peak_memory_kind": "cpu_peak_rss"}
