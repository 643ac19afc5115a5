"""Data-parallel compile under a real torchrun (2 CPU processes, gloo) == one process.

The tiny zoo model is compiled by one process and by ``python -m torch.distributed.run
--nproc_per_node 2 -m flexc.cli compile``, in memory (Taylor scores: a backward per batch) and
layer-streamed (Taylor scores: the streamed backward too). The width tables must be identical and every exported
tensor equal within 1e-6: the ranks' score sums are float64 and differ from one process's
only in summation order. A rank killed in a pass fails the run (non-zero exit, a message naming
the failure, nothing exported), and the same command then resumes to the same artifacts.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import flexc
from flexc.compiler.data_parallel import check_data_parallel
from flexc.compiler.spec import Spec
from flexc.errors import FlexcError
from flexc.ir.tables import WIDTHS_FILE
from flexc.utils import distributed

ROOT = Path(__file__).parent.parent
HELPERS = Path(__file__).parent / "distributed"  # the rank_killer pass
TOLERANCE = 1e-6
TIMEOUT_S = 60  # FLEXC_DIST_TIMEOUT for the runs here


def _spec(model_dir: Path, score: str, *, stream: str = "off", kill_step: bool = False) -> dict:
    pipeline = [{"rank_channels": {"score": score, "plot": False}}, "coverage", "fold_masks"]
    if kill_step:
        pipeline.insert(1, "rank_killer:KillRank")
    return {
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "data": {"calibration": {"builtin": "python-stdlib", "num_samples": 8, "seq_len": 32, "batch_size": 2}},
        "budgets": {"keep": [0.75, 0.5]},
        "pipeline": pipeline,
        "export": {"formats": ["nested", "sliced"]},
        "execution": {"stream": stream},
    }


def _write(spec: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(spec: Path, out: Path, tmp: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """``flexc compile`` under torchrun with 2 processes; ``tmp`` is their TMPDIR (scratch folders)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "flexc.cli", "compile", str(spec), "--out", str(out), "-q"]
    tmp.mkdir(exist_ok=True)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HELPERS)]), "OMP_NUM_THREADS": "1",
                   "TMPDIR": str(tmp), "FLEXC_DIST_TIMEOUT": str(TIMEOUT_S), **env}
    started = time.perf_counter()
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    return done, time.perf_counter() - started


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            out.update({f"{f.relative_to(directory)}:{k}": handle.get_tensor(k) for k in handle.keys()})
    return out


def assert_same_artifacts(one: Path, two: Path) -> None:
    for tables in ("state", "nested"):  # the width tables: the hand-off state's and the artifact's
        with safe_open(str(one / tables / WIDTHS_FILE), "pt") as a, safe_open(str(two / tables / WIDTHS_FILE), "pt") as b:
            assert torch.equal(a.get_tensor("widths"), b.get_tensor("widths")), tables
    for fmt in ("nested", "sliced"):
        ta, tb = _tensors(one / fmt), _tensors(two / fmt)
        assert ta and set(ta) == set(tb), sorted(set(ta) ^ set(tb))[:5]
        for name in ta:
            assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
            diff = float((ta[name].double() - tb[name].double()).abs().max()) if ta[name].numel() else 0.0
            assert diff <= TOLERANCE, f"{fmt}/{name}: max difference {diff:.3g}"


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} - {".flexc.lock"}


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """One process's compiles (the reference): Taylor scores, in memory and layer-streamed."""
    root = tmp_path_factory.mktemp("one-process")
    flexc.compile(_spec(tiny_model_dir, "taylor"), out=root / "taylor", quiet=True)
    flexc.compile(_spec(tiny_model_dir, "taylor", stream="layers"), out=root / "streamed", quiet=True)
    return root


@pytest.mark.parametrize("score, stream", [("taylor", "off"), ("taylor", "layers")], ids=["in-memory", "streamed"])
def test_two_processes_write_what_one_process_writes(score, stream, one_process, tiny_model_dir, tmp_path):
    spec = _write(_spec(tiny_model_dir, score, stream=stream), tmp_path / "spec.yaml")
    done, _ = torchrun(spec, tmp_path / "out", tmp_path / "tmp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference = one_process / ("taylor" if stream == "off" else "streamed")
    assert_same_artifacts(reference, tmp_path / "out")
    # rank 0 wrote the same files one process writes; rank 1 left no scratch folder behind
    assert _files(tmp_path / "out") == _files(reference)
    assert not list((tmp_path / "tmp").glob("flexc-rank*"))
    # the routing statistics are sums over every batch, counted once
    ours = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert ours["status"] == "complete"
    with safe_open(str(tmp_path / "out" / "state" / "compile_state.safetensors"), "pt") as state:
        counts = state.get_tensor("routing_counts")
    top_k, tokens = 2, 8 * 32  # the tiny model routes each of 8 x 32 tokens to 2 experts per layer
    assert counts.sum(dim=1).tolist() == [float(top_k * tokens)] * counts.shape[0]


def test_killed_rank_fails_the_run_and_a_rerun_resumes(one_process, tiny_model_dir, tmp_path):
    spec = _write(_spec(tiny_model_dir, "taylor", kill_step=True), tmp_path / "spec.yaml")
    out = tmp_path / "out"
    done, seconds = torchrun(spec, out, tmp_path / "tmp", FLEXC_TEST_KILL_RANK="1")
    assert done.returncode != 0
    assert seconds < 120 + TIMEOUT_S  # startup on 2 shared cores, then the failure within the timeout
    output = done.stdout + done.stderr
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\n\s*exitcode\s*: -9", output)  # torchrun's summary: rank 1 was killed
    manifest = json.loads((out / "manifest.json").read_text())
    failed = [s for s in manifest["stages"] if s["status"] == "failed"]
    assert [s["name"] for s in failed] == ["02-rank_killer.KillRank"]  # rank 0 recorded where and why it stopped
    assert "rank 0: " in failed[0]["error"] and "run the same command again to resume" in failed[0]["error"]
    assert not (out / "nested").exists() and not (out / "sliced").exists() and not (out / "report.md").exists()
    assert json.loads((out / "state" / "stage.json").read_text())["stage"] == "01-rank_channels"

    done, _ = torchrun(spec, out, tmp_path / "tmp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming after stage 01-rank_channels" in (out / "compile.log").read_text()
    assert_same_artifacts(one_process / "taylor", out)


# --------------------------------------------------------------------------- without torchrun


@pytest.fixture
def two_ranks(monkeypatch):
    """This process pretends to be rank 1 of 2 (for the checks that need no peer)."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)


def test_training_passes_and_an_empty_pipeline_are_refused_under_torchrun(two_ranks, tiny_model_dir):
    spec = _spec(tiny_model_dir, "taylor")
    spec["pipeline"] = [{"rank_channels": {"score": "taylor"}}, "insert_action_gates", "anneal", "fold_masks",
                        "recover"]
    with pytest.raises(FlexcError, match="2 processes") as info:
        check_data_parallel(Spec.model_validate(spec))
    assert "pass 'anneal' cannot run under torchrun" in str(info.value)
    assert "pass 'recover' cannot run under torchrun" in str(info.value)
    with pytest.raises(FlexcError, match="nothing to split"):
        check_data_parallel(Spec.model_validate({**spec, "pipeline": []}))
    with pytest.raises(FlexcError, match="model.device 'cuda:1' puts every rank on one GPU"):
        check_data_parallel(Spec.model_validate({**spec, "model": {**spec["model"], "device": "cuda:1"}}))
    check_data_parallel(Spec.model_validate(_spec(tiny_model_dir, "activation")))  # what the tests above run


def test_batches_are_dealt_round_robin(two_ranks):
    assert list(distributed.shard(range(5))) == [1, 3]
    assert len(distributed.shard(range(5))) == 2
    with pytest.raises(FlexcError, match="1 calibration batch"):
        distributed.shard(range(1))


def test_a_bad_timeout_is_a_user_error(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(FlexcError, match="FLEXC_DIST_TIMEOUT must be a positive number of seconds; found 'soon'"):
        distributed.timeout_seconds()
