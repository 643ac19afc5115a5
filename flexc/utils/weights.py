"""Safetensors weight files checked from their headers and sizes alone (a truncated download fails
here, before minutes of loading). Used by model resolution, spec checks and the artifact runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (call :func:`check_safetensors` first)."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def check_safetensors(path: Path) -> str | None:
    """What is wrong with a ``.safetensors`` file, from its header and size alone (None: looks whole).

    Layout: 8-byte little-endian header length, a JSON header mapping tensor names to dtype, shape
    and ``data_offsets`` into the data that follows. A truncated download fails here, before
    minutes of loading.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return f"{path}: truncated safetensors file ({size} bytes; not even the 8-byte header length)"
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                return f"{path}: corrupt or truncated safetensors file (header of {n:,} bytes in a {size:,}-byte file)"
            header = json.loads(f.read(n))
    except OSError as exc:
        return f"{path}: cannot read: {exc}"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{path}: corrupt safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{path}: corrupt safetensors file (its header is not a JSON object)"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            count = 1
            for d in info["shape"]:
                count *= int(d)
            expected = count * _DTYPE_BYTES.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            return f"{path}: corrupt safetensors file (bad header entry for tensor {name!r})"
        if begin > stop or (expected and stop - begin != expected):
            return f"{path}: corrupt safetensors file (tensor {name!r} has offsets {begin}..{stop})"
        end = max(end, stop)
    if 8 + n + end > size:
        return (f"{path}: truncated safetensors file: the header describes {8 + n + end:,} bytes, "
                f"the file has {size:,} (an interrupted download or copy?)")
    return None


def check_weight_files(directory: Path) -> list[str]:
    """Problems with the weight files of a model directory, found without loading them."""
    problems = []
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return [f"{index}: not a safetensors index (a JSON object with a weight_map): {exc}"]
        problems += [f"{index} names {s}, which is missing" for s in shards if not (directory / s).is_file()]
    files = sorted(directory.glob("*.safetensors"))
    if not files and not index.is_file() and not any(directory.glob("*.bin")):
        problems.append(f"{directory} has no weights (no *.safetensors or *.bin files)")
    problems += [msg for f in files if (msg := check_safetensors(f))]
    return problems
