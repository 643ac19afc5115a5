"""Safetensors weight files checked from their headers and sizes alone (a truncated download fails
here, before minutes of loading). Used by model resolution, spec checks and the artifact runtime."""

from __future__ import annotations

import json
import re
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
    """What is wrong with a ``.safetensors`` file, from its header and size alone (None: looks whole),
    and what to do about it."""
    problem = _safetensors_problem(path)
    return None if problem is None else f"{problem}; expected a whole safetensors file: download or copy it again"


def _safetensors_problem(path: Path) -> str | None:
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


def check_generation_config(directory: Path) -> list[str]:
    """A ``generation_config.json`` that is not a JSON object (transformers ignores it silently: the
    exports would lose the model's generation settings)."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [f"{path}: not a generation config ({type(exc).__name__}: {exc}); expected a JSON object such as "
                "{\"eos_token_id\": 2}, or remove the file"]
    if not isinstance(raw, dict):
        return [f"{path}: expected a JSON object (a generation config); found a JSON {type(raw).__name__}"]
    return []


def check_weight_files(directory: Path) -> list[str]:
    """Problems with the weight files (and the generation config) of a model directory, found without loading them."""
    problems = check_generation_config(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return [f"{index}: not a safetensors index ({type(exc).__name__}: {exc}); expected a JSON object with a "
                    "weight_map: download or copy it again"]
        problems += [f"{index} names {s}, which is missing; expected every shard the index names: download it again"
                     for s in shards if not (directory / s).is_file()]
    files = sorted(directory.glob("*.safetensors"))
    if not files and not index.is_file() and not any(directory.glob("*.bin")):
        problems.append(f"{directory} has no weights (no *.safetensors or *.bin files); expected model.safetensors, "
                        "or shards with model.safetensors.index.json")
    problems += [msg for f in files if (msg := check_safetensors(f))]
    if not problems and files:
        problems += _missing_expert_tensors(directory, files)
    return problems


_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(.+)$")  # per-expert tensors: <...>.experts.<e>.<name>


def _missing_expert_tensors(directory: Path, files: list[Path]) -> list[str]:
    """Per-expert tensors some experts lack (transformers stacks them into one tensor per layer and
    fails with a message about its conversion report); a checkpoint with stacked experts has none."""
    try:
        raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return []  # reported by the config checks
    experts = next((raw[k] for k in ("num_experts", "num_local_experts", "n_routed_experts")
                    if isinstance(raw, dict) and isinstance(raw.get(k), int)), None)
    if experts is None:
        return []
    found: dict[str, dict[str, set[int]]] = {}
    where: dict[str, Path] = {}
    for f in files:
        for key in read_safetensors_header(f):
            m = _EXPERT_KEY.match(key)
            if m:
                found.setdefault(m[1], {}).setdefault(m[3], set()).add(int(m[2]))
                where[m[1]] = f
    names = {name for per_layer in found.values() for name in per_layer}
    missing = [f"{prefix}.{e}.{name}" for prefix, per_layer in sorted(found.items()) for name in sorted(names)
               for e in range(experts) if e not in per_layer.get(name, set())]
    if not missing:
        return []
    first = missing[0].rsplit(".experts.", 1)[0] + ".experts"
    return [f"{where[first]}: lacks {len(missing)} expert tensor(s) ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); expected {', '.join(sorted(names))} for each of the {experts} "
            f"experts of every MoE layer (config.json) — is the download complete?"]
