"""The command line: exit codes, where messages go, no tracebacks for user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexc.cli import main

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "broken_specs"))
import compiler_helpers as helpers  # noqa: E402



@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return helpers.make_dense(tmp_path_factory.mktemp("models") / "dense")


def write_spec(tmp_path: Path, moe_dir: Path, out: Path, extra: str = "") -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(f"model:\n  path: {moe_dir}\nbudgets:\n  keep: [0.5]\nexport:\n  dir: {out}\n{extra}")
    return path


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and "flexc" in capsys.readouterr().out


def test_validate_ok(tmp_path, moe_dir, capsys):
    spec = write_spec(tmp_path, moe_dir, tmp_path / "out")
    assert main(["validate", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "1 budget(s)" in out


def test_compile_quiet_then_up_to_date(tmp_path, moe_dir, capsys):
    out = tmp_path / "out"
    spec = write_spec(tmp_path, moe_dir, out)
    assert main(["compile", str(spec), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and (out / "manifest.json").is_file() and (out / "base" / "config.json").is_file()
    assert "load done" in (out / "compile.log").read_text()  # the log file gets everything
    assert main(["compile", str(spec)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_compile_out_flag_overrides_export_dir(tmp_path, moe_dir):
    spec = write_spec(tmp_path, moe_dir, tmp_path / "ignored")
    assert main(["compile", str(spec), "--out", str(tmp_path / "chosen"), "-q"]) == 0
    assert (tmp_path / "chosen" / "manifest.json").is_file() and not (tmp_path / "ignored").exists()


def test_compile_refuses_foreign_directory_with_exit_2(tmp_path, moe_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    spec = write_spec(tmp_path, moe_dir, out)
    assert main(["compile", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "not a flexc run" in err and "Traceback" not in err
    # --force deletes only what a flexc run wrote: a folder of the user's files stays refused.
    assert main(["compile", str(spec), "--force", "-q"]) == 2
    assert (out / "notes.txt").read_text() == "mine" and not (out / "manifest.json").exists()


def test_compile_spec_error_exit_2_and_verbose_traceback(tmp_path, moe_dir, capsys):
    spec = write_spec(tmp_path, moe_dir, tmp_path / "out", extra="seed: many\n")
    assert main(["compile", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"{spec}:7:7: seed: expected an integer; found 'many'" in err and "Traceback" not in err
    assert main(["compile", str(spec), "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_internal_error_exit_1_and_interrupt_130(tmp_path, moe_dir, monkeypatch, capsys):
    from flexc.compiler import driver

    spec = write_spec(tmp_path, moe_dir, tmp_path / "out")

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(driver, "compile", boom)
    assert main(["compile", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: kaboom" in err and "--verbose" in err and "Traceback" not in err

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "compile", interrupt)
    assert main(["compile", str(spec)]) == 130


def test_inspect_model_directory(moe_dir, capsys):
    assert main(["inspect", str(moe_dir)]) == 0
    out = capsys.readouterr().out
    assert "qwen3_moe" in out.lower().replace("-", "_") or "Qwen3" in out
    assert "routed experts" in out


def test_inspect_families_and_errors(dense_dir, tmp_path, capsys):
    assert main(["inspect", "--families"]) == 0
    assert "mixtral" in capsys.readouterr().out.lower()
    assert main(["inspect", str(tmp_path / "nowhere-model")]) == 2
    assert "neither a model directory nor a zoo model" in capsys.readouterr().err
    assert main(["inspect", str(dense_dir)]) == 2
    assert "no MoE layers found" in capsys.readouterr().err
    assert main(["inspect"]) == 2


def test_zoo_list(capsys):
    pytest.importorskip("flexc.zoo")
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "small" in out


def test_real_process_validate_and_schema(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = HERE / "broken_specs" / "budget_unsorted.yaml"
    proc = subprocess.run([sys.executable, "-m", "flexc", "validate", str(bad)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"{bad}:5:16: budgets.prune[1]:" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "flexc", "schema"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["title"]
