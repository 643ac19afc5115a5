"""What a compile may delete, what a resume may run, and one compile per output directory.

Each test reproduces a defect of an earlier version: ``--force`` emptied a parent of the
working directory or a git checkout; resuming imported any ``module:Class`` the saved graph
named, and could not replay a user pass whose class name differs from its spec entry; two
compiles wrote one directory side by side.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flexc.cli import main

sys.path.insert(0, str(Path(__file__).parent / "broken_specs"))
import compiler_helpers as helpers  # noqa: E402




def write_spec(path: Path, moe_dir: Path, out: str, pipeline: str = "[]") -> Path:
    path.write_text(f"model: {{path: {moe_dir}}}\nbudgets: {{keep: [0.5]}}\npipeline: {pipeline}\n"
                    f"export: {{dir: {out}}}\n")
    return path


def compile_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["compile", *args, "--quiet"])
    out, err = capsys.readouterr()
    return code, out + err


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_force_refuses_a_parent_of_the_working_directory(moe_dir, tmp_path, monkeypatch, capsys):
    work = tmp_path / "project" / "work"
    work.mkdir(parents=True)
    (tmp_path / "project" / "notes.txt").write_text("keep me")
    spec = write_spec(work / "spec.yaml", moe_dir, "..")
    monkeypatch.chdir(work)
    before = tree(tmp_path / "project")
    code, text = compile_cli(capsys, "spec.yaml", "--force")
    assert code == 2 and "Traceback" not in text
    assert "refusing to clear output directory .." in text and "working directory" in text
    assert tree(tmp_path / "project") == before and spec.is_file()


def test_force_refuses_a_directory_tracked_by_git(moe_dir, tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "main.py").write_text("print('hi')\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "src/main.py"], check=True)
    spec = write_spec(tmp_path / "spec.yaml", moe_dir, str(repo / "src"))
    code, text = compile_cli(capsys, str(spec), "--force")
    assert code == 2 and "Traceback" not in text
    assert "version-controlled tree" in text
    assert (repo / "src" / "main.py").read_text() == "print('hi')\n"


def test_force_replaces_a_run_git_ignores(moe_dir, tmp_path, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/runs/\n")
    out = repo / "runs" / "x"
    spec = write_spec(tmp_path / "spec.yaml", moe_dir, str(out))
    assert compile_cli(capsys, str(spec))[0] == 0
    code, text = compile_cli(capsys, str(spec), "--force")
    assert code == 0, text
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_force_refuses_files_no_flexc_run_wrote(moe_dir, tmp_path, capsys):
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.yaml", moe_dir, str(out))
    assert compile_cli(capsys, str(spec))[0] == 0
    (out / "thesis.tex").write_text("years of work")
    code, text = compile_cli(capsys, str(spec), "--force")
    assert code == 2 and "no flexc run wrote (thesis.tex)" in text
    assert (out / "thesis.tex").read_text() == "years of work" and (out / "manifest.json").is_file()


@pytest.mark.parametrize("inside", ["model", "data"])
def test_force_refuses_a_directory_holding_the_model_or_data(moe_dir, tmp_path, capsys, inside):
    import shutil

    out = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.yaml", moe_dir, str(out))
    assert compile_cli(capsys, str(spec))[0] == 0
    if inside == "model":
        model = shutil.copytree(moe_dir, out / "base" / "model")
        spec = write_spec(tmp_path / "spec2.yaml", model, str(out))
    else:
        data = out / "base" / "calib.txt"
        data.write_text("def f():\n    return 1\n" * 50)
        spec.write_text(spec.read_text() + f"data: {{calibration: {{files: [{data}], num_samples: 2, seq_len: 32}}}}\n")
    before = tree(out)
    code, text = compile_cli(capsys, str(spec), "--force")
    assert code == 2 and "Traceback" not in text
    assert ("model directory" if inside == "model" else "calibration data file") in text
    assert tree(out) == before


def test_a_failed_run_of_another_spec_does_not_block_the_corrected_spec(moe_dir, tmp_path, capsys):
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.yaml", moe_dir, str(out))
    assert compile_cli(capsys, str(spec))[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(status="failed", spec_fingerprint="other")
    for record in manifest["stages"]:
        record["status"] = "failed" if record["name"] != "load" else "done"
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, text = compile_cli(capsys, str(spec))
    assert code == 0, text


USER_PASS = '''
from flexc.passes import Pass, PassResult
import torch


class AddMarker(Pass):
    """A structural rewrite the way docs/writing-a-pass.md teaches: registered in graph.rewrites."""

    name = "add_marker"
    replays = []

    def run(self, graph, ctx):
        graph.module.register_buffer("user_marker", torch.full((2,), 7.0))
        graph.rewrites.append({"pass": self.name, "options": self.options.model_dump(mode="json")})
        return PassResult(graph=graph)

    def replay(self, graph, workdir):
        AddMarker.replays.append(str(workdir))
        self.run(graph, None)
'''


def _resume_next_time(out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["status"] = "interrupted"
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_resume_replays_a_user_pass_by_its_spec_entry(moe_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "userpasses.py").write_text(USER_PASS)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.yaml", moe_dir, str(out), "[{name: 'userpasses:AddMarker'}]")
    assert compile_cli(capsys, str(spec))[0] == 0
    meta = json.loads((out / "state" / "graph" / "graph_meta.json").read_text())
    assert meta["rewrites"] == [{"pass": "add_marker", "options": {}, "stage": "01-userpasses.AddMarker"}]
    _resume_next_time(out)
    import userpasses

    code, text = compile_cli(capsys, str(spec))
    assert code == 0, text
    assert len(userpasses.AddMarker.replays) == 1


def test_replayed_rewrites_keep_their_stage_so_a_second_resume_replays_them_too(tmp_path):
    from flexc.ir import lower
    from flexc.ir.testing import tiny_model
    from flexc.passes import PassContext
    from flexc.passes.manager import PassRunner, replayer

    namespace: dict = {}
    exec(USER_PASS, namespace)
    marker = namespace["AddMarker"]()
    graph = lower(tiny_model("qwen3_moe"))
    PassRunner(graph, PassContext(workdir=tmp_path), tmp_path / "stages").run("01-add_marker", marker)
    assert graph.rewrites == [{"pass": "add_marker", "options": {}, "stage": "01-add_marker"}]
    graph.save_state(tmp_path / "state0")
    for resume in (1, 2):  # each resume saves the graph it replayed; the next one reads that
        fresh = lower(tiny_model("qwen3_moe"))
        fresh.load_state(tmp_path / f"state{resume - 1}", replay=replayer({"01-add_marker": marker}))
        assert fresh.rewrites == graph.rewrites
        fresh.save_state(tmp_path / f"state{resume}")


def test_resume_imports_nothing_the_saved_state_names(moe_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "userpasses.py").write_text(USER_PASS)
    sentinel = tmp_path / "imported"
    (tmp_path / "evil.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(sentinel)!r}).touch()
        from userpasses import AddMarker as Evil
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.yaml", moe_dir, str(out), "[{name: 'userpasses:AddMarker'}]")
    assert compile_cli(capsys, str(spec))[0] == 0
    meta_file = out / "state" / "graph" / "graph_meta.json"
    meta = json.loads(meta_file.read_text())
    meta["rewrites"].append({"pass": "evil:Evil", "options": {}})
    meta_file.write_text(json.dumps(meta))
    _resume_next_time(out)
    code, text = compile_cli(capsys, str(spec))  # the edit is seen: the file is not as recorded
    assert code == 2 and "Traceback" not in text
    assert f"{meta_file}: changed since stage 01-userpasses.AddMarker wrote it" in text and "--force" in text
    helpers.rehash(out)  # and with the manifest edited to match, the replay still imports nothing
    code, text = compile_cli(capsys, str(spec))
    assert code == 2 and "Traceback" not in text
    assert "'evil:Evil'" in text and "--force" in text
    assert not sentinel.exists() and "evil" not in sys.modules


def test_a_second_compile_into_a_locked_directory_is_refused(moe_dir, tmp_path, capsys):
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.yaml", moe_dir, str(out))
    assert compile_cli(capsys, str(spec))[0] == 0
    _resume_next_time(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from filelock import FileLock; l = FileLock(sys.argv[1]); "
         "l.acquire(); print('held', flush=True); sys.stdin.read()", str(out / ".flexc.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, text = compile_cli(capsys, str(spec))
        assert code == 2 and "another flexc compile is writing to" in text
        assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"  # untouched
    finally:
        holder.communicate("")
    code, text = compile_cli(capsys, str(spec))  # released: the run goes on
    assert code == 0, text
