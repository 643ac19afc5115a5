"""What a user sees: --quiet silences library progress bars, light commands start fast
(no torch import), compile ends with the budget table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexc.cli import main
from flexc.compiler import logs

HERE = Path(__file__).parent
ROOT = HERE.parent



@pytest.fixture
def restore_bars():
    yield
    logs.setup(0)  # later tests in this process get the default verbosity back


def test_quiet_hides_library_progress_bars(moe_dir, capfd, restore_bars):
    assert main(["inspect", str(moe_dir)]) == 0
    assert "Loading weights" in capfd.readouterr().err  # the bar this test is about exists
    for argv in (["-q", "inspect", str(moe_dir)], ["inspect", "--quiet", str(moe_dir)]):
        assert main(argv) == 0
        captured = capfd.readouterr()
        assert "routed experts" in captured.out
        assert captured.err == "", captured.err
    assert main(["inspect", str(moe_dir)]) == 0  # bars come back without --quiet
    assert "Loading weights" in capfd.readouterr().err


@pytest.mark.parametrize("argv", [["zoo", "list"], ["inspect", "--families"]])
def test_light_commands_do_not_import_torch(argv, tmp_path):
    code = ("import sys; from flexc.cli import main; rc = main(%r); "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert rc == 0 and not heavy, (rc, heavy)" % (argv,))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_ir_package_names_load_on_first_use():
    import flexc.ir
    import flexc.ir.lower  # the submodule must not hide the function of the same name

    from flexc.ir import lower

    assert callable(lower) and lower is flexc.ir.lower and lower.__module__ == "flexc.ir.lower"
    assert flexc.ir.FlexGraph.__name__ == "FlexGraph"
    with pytest.raises(AttributeError):
        flexc.ir.no_such_name  # noqa: B018


def test_zoo_manifest_format_matches_the_trainer():
    import flexc.zoo
    import flexc.zoo.train

    assert flexc.zoo.MANIFEST_FORMAT == flexc.zoo.train.MANIFEST_FORMAT


def test_compile_ends_with_the_budget_table_and_the_report(moe_dir, tmp_path, capsys):
    out = tmp_path / "run"
    data = "{builtin: python-stdlib, split: %s, num_samples: 2, seq_len: 16, batch_size: 2}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"model:\n  path: {moe_dir}\ndata:\n  calibration: {data % 'train'}\n"
                    f"  evaluation: {data % 'heldout'}\nbudgets:\n  keep: [0.75, 0.5]\n"
                    "pipeline: [{rank_channels: {score: activation, plot: false}}, uniform]\n"
                    f"export:\n  dir: {out}\n  formats: []\n")
    assert main(["compile", str(spec)]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert [r["keep"] for r in summary["budgets"]] == [1.0, 0.75, 0.5]
    assert all(r["perplexity"] > 1 and r["total_params"] > 0 for r in summary["budgets"])
    lines = text.strip().splitlines()
    assert lines[-1] == f"report: {out / 'report.md'}"
    assert "held-out ppl" in text and "1 (unpruned)" in text
    for r in summary["budgets"][1:]:  # each budget's row: target, achieved keep, perplexity
        row = next(line for line in lines if line.strip("│ ").startswith(f"{r['keep']:g} "))
        assert f"{r['keep_achieved']:.3f}" in row and f"{r['perplexity']:.2f}" in row
    assert main(["compile", str(spec)]) == 0  # up to date: the same table, from the manifest
    again = capsys.readouterr().out
    assert "up to date" in again and again.strip().splitlines()[-1] == lines[-1]
    assert main(["-q", "compile", str(spec)]) == 0 and capsys.readouterr().out == ""
