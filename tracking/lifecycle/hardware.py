"""What a run ran on, logged as `hw.*` params: results depend on it.

The same recipe and seed give different per-epoch accuracies on different CPUs, mostly through
the bf16 kernels oneDNN picks (AMX on recent Xeons, AVX-512 BF16, or emulation), and through
the thread count. So every run records the CPU model, torch's CPU capability, what oneDNN can
use, the threads and the CUDA device.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

# cpuinfo flags that decide which bf16 kernels oneDNN dispatches to
BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")


def cpuinfo(path: str | Path = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """(model name, flags) of the first processor; ("", set()) where there is no cpuinfo."""
    try:
        text = Path(path).read_text()
    except OSError:
        return "", set()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
    return (model.group(1).strip() if model else "",
            set(flags.group(1).split()) if flags else set())


def onednn_version() -> str:
    """From torch's build configuration, e.g. "3.12.0"; "" when not built with oneDNN."""
    found = re.search(r"(?:MKL-DNN|oneDNN)\s+v([\w.]+)", torch.__config__.show())
    return found.group(1) if found else ""


def hardware(cpuinfo_path: str | Path = "/proc/cpuinfo") -> dict[str, str | int | bool]:
    """The machine and torch's view of it, right now (the thread count can change per run)."""
    model, flags = cpuinfo(cpuinfo_path)
    onednn = torch.backends.mkldnn.is_available() and bool(torch.backends.mkldnn.enabled)
    info: dict[str, str | int | bool] = {
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count() or 0,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "onednn": onednn,
        "onednn_version": onednn_version(),
        **{flag: flag in flags for flag in BF16_FLAGS},
        # what a bf16 convolution most likely runs on; ONEDNN_MAX_CPU_ISA can cap it
        "onednn_bf16_isa": ("none" if not onednn else "amx" if "amx_bf16" in flags
                            else "avx512_bf16" if "avx512_bf16" in flags else "emulated"),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if cap:
        info["onednn_max_cpu_isa"] = cap
    return info


def bf16_warning(precision: str, device: str, cpuinfo_path: str | Path = "/proc/cpuinfo") -> str | None:
    """A line for a user who asked for bf16 on a CPU that has to emulate it (no AVX-512 BF16,
    no AMX): oneDNN then converts every tensor and the run is slower than in fp32."""
    if precision != "bf16" or device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return None
    _, flags = cpuinfo(cpuinfo_path)
    if not flags or flags & {"amx_bf16", "avx512_bf16"}:
        return None  # native bf16, or a CPU we cannot read (no claim either way)
    return ("mnist-mlflow: warning: precision=bf16 on a CPU without AVX-512 BF16 or AMX: bf16 is "
            "emulated here and slower than fp32 (use --set precision=fp32)")


def params() -> dict[str, str | int | bool]:
    """`hardware()` as run params, prefixed `hw.`."""
    return {f"hw.{k}": v for k, v in hardware().items()}
