"""Every code block in README.md and docs/*.md runs, on the ``tiny`` zoo model.

- ```python: executed in a fresh namespace (each block is complete by itself);
- ```bash: each command must be ``flexc ...`` (``\\`` continuations and ``#`` comments allowed);
  it runs through ``flexc.cli.main`` and must exit 0;
- ```yaml: a spec (it has ``model:``) must pass ``flexc validate``; a fragment must pass it once
  completed with ``specs/quickstart.yaml``'s ``model``, ``data`` and ``budgets`` (its own keys win);
- other fences (toml, plain text, terminal output) are not code to run.

A block that cannot run here is marked on the line right before it with
``<!-- not-tested: REASON -->``; it is reported as a skip with its reason (``pytest -rs``), and
such marks stay rare (``MAX_NOT_TESTED``).

Each block runs in its own working directory holding ``specs/`` (the repository's specs, except
that ``specs/quickstart.yaml`` is a cheaper copy: fewer calibration samples and anneal steps),
links to ``tests/``, ``docs/`` and ``benchmarks/``, and ``runs/quickstart``: that cheap
quickstart compiled once per session (a hard-linked copy per block: flexc replaces files, never
writes into them, so blocks cannot change the original).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^\s*<!--\s*not-tested:\s*(.+?)\s*-->\s*$")  # alone on its line
FENCE = re.compile(r"^```(\w*)\s*$")
RUN = {"python", "bash", "sh", "shell", "yaml", "yml"}
MAX_NOT_TESTED = 8


@dataclass
class Block:
    file: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_tested: str | None

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    out, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.match(prev)
        out.append(Block(path, i + 1, m.group(1).lower(), "\n".join(lines[i + 1:end]) + "\n",
                         mark.group(1) if mark else None))
        i = end + 1
    return out


ALL = [b for path in DOCS for b in blocks(path)]
RUNNABLE = [b for b in ALL if b.lang in RUN]


# ------------------------------------------------------------------------- working directories


def cheap_quickstart() -> str:
    spec = yaml.safe_load((ROOT / "specs" / "quickstart.yaml").read_text())
    for role in ("calibration", "evaluation"):
        spec["data"][role].update(num_samples=8, seq_len=64, batch_size=4)
    for entry in spec["pipeline"]:
        if isinstance(entry, dict) and "anneal" in entry:
            entry["anneal"]["steps"] = 20
    return "# specs/quickstart.yaml with fewer samples and steps (tests/test_docs.py)\n" + yaml.safe_dump(
        spec, sort_keys=False)


@pytest.fixture(scope="session")
def doc_base(tmp_path_factory, tiny_model_dir):
    """A directory with the cheap quickstart spec compiled into runs/quickstart (once)."""
    import flexc

    base = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "specs", base / "specs")
    (base / "specs" / "quickstart.yaml").write_text(cheap_quickstart())
    cwd = Path.cwd()
    os.chdir(base)
    try:
        result = flexc.compile("specs/quickstart.yaml", quiet=True)
    finally:
        os.chdir(cwd)
    assert result.manifest["status"] == "complete"
    return base


@pytest.fixture
def workdir(doc_base, tmp_path, monkeypatch):
    for name in ("tests", "docs", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "specs").symlink_to(doc_base / "specs")
    shutil.copytree(doc_base / "runs", tmp_path / "runs", copy_function=os.link)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "docs" / "examples"))  # `cold_experts:...` in docs/writing-a-pass.md
    return tmp_path


# ------------------------------------------------------------------------- running blocks


def run_python(block: Block) -> None:
    exec(compile(block.code, block.id, "exec"), {"__name__": "__doc_block__"})


def commands(code: str) -> list[list[str]]:
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        args = shlex.split(line, comments=True)
        if args:
            out.append(args)
    return out


def run_bash(block: Block) -> None:
    from flexc.cli import main

    for args in commands(block.code):
        assert args[0] == "flexc" and not set(args) & {"&&", "|", ";", ">"}, (
            f"{block.id}: only single `flexc ...` commands run here; mark the block `<!-- not-tested: why -->`")
        assert main(args[1:]) == 0, f"{block.id}: `{shlex.join(args)}` failed"


def run_yaml(block: Block, workdir: Path) -> None:
    from flexc.cli import main

    doc = yaml.safe_load(block.code)
    assert isinstance(doc, dict), f"{block.id}: not a YAML mapping"
    text = block.code
    if "model" not in doc:  # a fragment: completed with the quickstart's model, data and budgets
        quickstart = yaml.safe_load((ROOT / "specs" / "quickstart.yaml").read_text())
        text = yaml.safe_dump({k: quickstart[k] for k in ("model", "data", "budgets")} | doc, sort_keys=False)
    path = workdir / "block.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 0, f"{block.id}: `flexc validate` refused it"


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_doc_block_runs(block: Block, request):
    if block.not_tested:
        pytest.skip(f"not tested: {block.not_tested}")
    workdir = request.getfixturevalue("workdir")
    if block.lang == "python":
        run_python(block)
    elif block.lang in ("bash", "sh", "shell"):
        run_bash(block)
    else:
        run_yaml(block, workdir)


def test_not_tested_marks_are_few_and_each_marks_a_block():
    marked = [b for b in ALL if b.not_tested]
    for b in marked:
        print(f"{b.id}: {b.not_tested}", file=sys.stderr)
    assert len(marked) <= MAX_NOT_TESTED, "keep `not-tested` marks rare: make the block runnable instead"
    for path in DOCS:
        marks = sum(bool(MARK.match(line)) for line in path.read_text(encoding="utf-8").splitlines())
        assert marks == sum(b.not_tested is not None for b in ALL if b.file == path), (
            f"{path.name}: a `not-tested` mark that is not right before a code block")


def test_every_doc_file_is_covered():
    assert {b.file.name for b in RUNNABLE} >= {"README.md", "spec.md", "evaluation.md", "writing-a-pass.md"}
