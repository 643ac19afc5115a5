"""What a user sees: --quiet silences library progress bars, light commands start fast
(no torch import), compile ends with the budget table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexc.cli import main
from flexc.compiler import logs

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "broken_specs"))
import compiler_helpers as helpers  # noqa: E402


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return helpers.make_tiny_moe(tmp_path_factory.mktemp("models") / "tiny-moe")


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
