"""The output directory of a compile: layout, manifest, atomic writes, resume.

Layout of ``<out>/``::

    manifest.json    what ran: flexc and library versions, seed, spec fingerprint,
                     one record per stage (status, seconds, outputs), the outputs
    spec.yaml        the spec as run
    compile.log      the full log (appended by every run)
    report.md        budgets, sizes, held-out perplexity, widths, stage times (figures in report/)
    base/            the loaded model as a Hugging Face checkpoint (empty pipeline only)
    state/           graph + pass hand-off state after the last completed pass (for resume)
    <format>/        one directory per export format

Every file is written to a temporary sibling and renamed into place; every directory is
built in a temporary sibling and renamed. A directory that holds files but no flexc
manifest is never touched without ``force``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from flexc.compiler.errors import OutputDirError
from flexc.utils.atomic import atomic_path, default_mode

MANIFEST = "manifest.json"
SPEC_FILE = "spec.yaml"
LOG_FILE = "compile.log"
REPORT_FILE = "report.md"
STATE_DIR = "state"
BASE_DIR = "base"
MANIFEST_KIND = "flexc-compile-run"
MANIFEST_VERSION = 1

_LIBRARIES = ("torch", "transformers", "pydantic", "safetensors", "datasets", "tokenizers", "triton", "numpy")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("flexc",) + _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["flexc"] is None:
        from flexc import __version__

        out["flexc"] = __version__
    return out


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically, with ordinary permissions."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success it becomes ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        default_mode(tmp)
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, target: Path) -> None:
    """Rename ``src`` to ``target``, replacing a previous ``target`` (moved aside, then deleted)."""
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, trash)
        os.replace(src, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, target)


# --------------------------------------------------------------------------- ctx.state


def _flatten_state(value: Any, path: str, tensors: dict[str, Any]) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        key = path or "_"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"ctx.state key {k!r} at {path or '(top)'} is not a string")
            out[k] = _flatten_state(v, f"{path}/{k}" if path else k, tensors)
        return out
    if isinstance(value, (list, tuple)):
        return [_flatten_state(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(
        f"ctx.state[{path!r}] holds a {type(value).__name__}, which cannot be persisted between stages "
        "(use tensors, numbers, strings, lists and dicts)"
    )


def _unflatten_state(value: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _unflatten_state(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten_state(v, tensors) for v in value]
    return value


def save_pass_state(state: dict[str, Any], directory: Path) -> None:
    """Persist a pass context's ``state``: tensors in safetensors, everything else in JSON."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    tree = _flatten_state(state, "", tensors)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "ctx_state.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(directory / "ctx_state.json", tree)


def load_pass_state(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tree = json.loads((directory / "ctx_state.json").read_text())
    tensors = load_file(str(directory / "ctx_state.safetensors"))
    return _unflatten_state(tree, tensors)


# --------------------------------------------------------------------------- run directory


def _dangerous(path: Path) -> bool:
    p = path.resolve()
    return p in {Path.cwd().resolve(), Path.home().resolve(), Path(p.anchor)} or (p / ".git").exists()


@dataclass
class RunDir:
    """An output directory and its manifest."""

    path: Path
    manifest: dict[str, Any]
    resumed: bool = False

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: Path, fingerprint: str, *, force: bool = False) -> "RunDir":
        """Open ``path`` for a run of the spec with ``fingerprint``.

        A new or empty directory starts a fresh run; a flexc run of the same spec resumes;
        anything else needs ``force`` (which clears the directory first).
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise OutputDirError(f"output path {path} exists and is not a directory")
        existing = read_manifest(path)
        has_files = path.exists() and any(path.iterdir())
        if existing is None and has_files:
            if not force:
                raise OutputDirError(
                    f"output directory {path} is not empty and is not a flexc run (no flexc {MANIFEST}); "
                    "flexc will not overwrite it — choose another directory (--out) or pass --force to replace it"
                )
            cls._clear(path)
        elif existing is not None and existing.get("spec_fingerprint") != fingerprint:
            if not force:
                raise OutputDirError(
                    f"output directory {path} holds a flexc run of a different spec "
                    f"(see {path / SPEC_FILE}); choose another directory (--out) or pass --force to replace it"
                )
            cls._clear(path)
        elif existing is not None and force:
            cls._clear(path)
        elif existing is not None:
            return cls(path, existing, resumed=True)
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "kind": MANIFEST_KIND,
            "manifest_version": MANIFEST_VERSION,
            "spec_fingerprint": fingerprint,
            "created": now(),
            "updated": now(),
            "status": "running",
            "runs": 0,
            "stages": [],
            "outputs": {},
        }
        run = cls(path, manifest)
        run.save()
        return run

    @staticmethod
    def _clear(path: Path) -> None:
        if _dangerous(path):
            raise OutputDirError(
                f"refusing to clear {path}: it is the working directory, a home or root directory, or a git checkout"
            )
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    # ---------------------------------------------------------------- manifest
    def save(self) -> None:
        self.manifest["updated"] = now()
        write_json(self.path / MANIFEST, self.manifest)

    def stage(self, name: str) -> dict[str, Any] | None:
        for record in self.manifest["stages"]:
            if record["name"] == name:
                return record
        return None

    def done(self, name: str) -> bool:
        record = self.stage(name)
        return record is not None and record.get("status") == "done"

    def record(self, name: str, **fields: Any) -> dict[str, Any]:
        record = self.stage(name)
        if record is None:
            record = {"name": name}
            self.manifest["stages"].append(record)
        record.update(fields)
        self.save()
        return record

    def set_plan(self, names: list[str]) -> None:
        """Order the stage records as the plan says (keeping what earlier runs recorded)."""
        known = {r["name"]: r for r in self.manifest["stages"]}
        self.manifest["stages"] = [known.get(n, {"name": n, "status": "pending"}) for n in names]
        self.save()


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The flexc manifest in ``path``, or None if there is none (or it is not flexc's)."""
    try:
        data = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == MANIFEST_KIND else None
