"""``execution.stream: auto``: compile in memory when the model fits, layer by layer when not.

The in-memory compile's peak resident memory was measured at 2.2 bytes per byte of weights plus
about 1 GB (the weights, the lowered graph's working set, a sliced copy at export;
``benchmarks/scale.py``, docs/scale.md); the estimate below keeps a margin over that. The
memory available is the compute device's: free GPU memory on CUDA, ``MemAvailable`` on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PEAK_PER_WEIGHT_BYTE = 2.5  # measured 2.2
FIXED_BYTES = 1 << 30  # the runtime, tokenizer, calibration data


@dataclass(frozen=True)
class StreamChoice:
    mode: str  # "off" (in memory) or "layers"
    model_bytes: int
    needed_bytes: int  # the in-memory compile's estimated peak
    available_bytes: int
    device: str

    def describe(self) -> str:
        gb = 1 << 30
        how = "in memory" if self.mode == "off" else "one decoder layer at a time (execution.stream: layers)"
        return (f"the model's weights take {self.model_bytes / gb:.2f} GB; an in-memory compile needs about "
                f"{self.needed_bytes / gb:.2f} GB and {self.available_bytes / gb:.2f} GB is available on "
                f"{self.device}: compiling {how}")

    def to_manifest(self) -> dict:
        return {"stream": "auto", "chosen": self.mode, "model_bytes": self.model_bytes,
                "needed_bytes": self.needed_bytes, "available_bytes": self.available_bytes, "device": self.device}


def model_bytes(directory: Path, dtype: str) -> int:
    """Bytes of the model's weights at ``dtype`` (``auto``: the checkpoint's), from its config alone
    (the model is built on the ``meta`` device: nothing is read or allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    if dtype == "auto":
        chosen = getattr(config, "dtype", None) or torch.float32
        chosen = getattr(torch, chosen) if isinstance(chosen, str) else chosen
    else:
        chosen = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=chosen)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def available_bytes(device: str) -> int:
    """Memory free for the compile on ``device`` (``cuda``, ``cuda:N`` or ``cpu``)."""
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or torch.cuda.current_device())
        return int(torch.cuda.mem_get_info(index)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose(directory: Path, dtype: str, device: str) -> StreamChoice:
    """In memory if the estimated in-memory peak fits what is available, else layer by layer."""
    weights = model_bytes(directory, dtype)
    needed = int(weights * PEAK_PER_WEIGHT_BYTE) + FIXED_BYTES
    available = available_bytes(device)
    return StreamChoice("off" if needed <= available else "layers", weights, needed, available, device)
