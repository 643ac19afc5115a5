"""Data-parallel compile under a real torchrun (2 CPU processes, gloo) == one process.

The tiny zoo model is compiled by one process and by ``python -m torch.distributed.run
--nproc_per_node 2 -m flexc.cli compile``, in memory (Taylor scores: a backward per batch) and
layer-streamed (Taylor scores: the streamed backward too). The width tables must be identical and every exported
tensor equal within 1e-6: the ranks' score sums are float64 and differ from one process's
only in summation order. A rank killed in a pass fails the run (non-zero exit, a message naming
the failure, nothing exported), and the same command then resumes to the same artifacts.

``anneal`` (each batch's sequences split over the ranks, the gradients summed every step) must
choose the same width tables as one process, from training histories equal within float32
rounding, straight through and when rank 1 dies mid-anneal and the rerun resumes from rank 0's
checkpoint.

``recover`` (the same split; the LoRA adapters' gradients summed every step before the clip) must
export the same merged weights as one process within float32 rounding, with the same loss
history, straight through and when rank 1 dies mid-recover and the rerun resumes from rank 0's
checkpoint.
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
# The anneal's losses are float32 sums over positions, split over ranks: 2 processes' values differ from one
# process's by about 1e-6 relative (measured: 1.2e-7 absolute at most in the history, on values up to 0.75).
ANNEAL_RTOL = 1e-5
# recover trains float32 LoRA adapters with Adam on summed, clipped gradients: the merged weights differ from one
# process's by rounding, on updates of about 2e-2 per weight (Adam divides by the gradients' root mean square, so
# their rounding differences reach the weights relative to the update, not to the gradient); how far depends on the
# adapters' random start (a gradient near zero at Adam's first step turns rounding into a step of its own): over
# six draws of it (measured by hand, in memory and streamed), the weights by 4.0e-6 to 4.0e-5 at most and the loss
# history by 4.0e-6 to 1.1e-4 relative. Measured on broken variants: ranks that never sum their gradients differ by
# 1.8e-2, ranks that clip before the sum by 1.7e-3.
RECOVER_ATOL = 2e-4
RECOVER_RTOL = 5e-4


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


def _anneal_spec(model_dir: Path, *, kill: bool = False, stream: str = "off") -> dict:
    """rank_channels, insert_action_gates, anneal (8 steps over 2 budgets, 4 batches of 2 sequences: 3 to train on,
    1 held out with the 4 sequences after them (2 more batches); from full width, so that the trained tables win on the held-out batch), fold_masks."""
    anneal = {"steps": 8, "checkpoint_every": 2, "schedule": {"warm_start": "full"}, "selection": {"z": 0, "samples": 4}}
    pipeline = [{"rank_channels": {"score": "taylor", "plot": False}}, "insert_action_gates", {"anneal": anneal},
                "fold_masks"]
    if kill:
        pipeline.insert(2, "rank_killer:KillInAnneal")
    return {**_spec(model_dir, "taylor", stream=stream), "pipeline": pipeline, "export": {"formats": ["nested"]}}


def _recover_spec(model_dir: Path, *, kill: bool = False, stream: str = "off") -> dict:
    """rank_channels, coverage, fold_masks, recover (4 distill steps at keep 0.5 on the 4 batches of 2 sequences,
    checkpoints every 2 steps; a high lr so that the adapters move the weights well above rounding; a gradient clip
    below every step's gradient norm (0.04 to 0.06), so that it acts on every step and must see the summed gradient)."""
    recover = {"keep": 0.5, "steps": 4, "lr": 1e-2, "rank": 4, "max_grad_norm": 0.02, "checkpoint_every": 2}
    pipeline = [{"rank_channels": {"score": "taylor", "plot": False}}, "coverage", "fold_masks", {"recover": recover}]
    if kill:
        pipeline.insert(3, "rank_killer:KillInRecover")
    return {**_spec(model_dir, "taylor", stream=stream), "pipeline": pipeline, "export": {"formats": ["nested"]}}


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


def assert_same_artifacts(one: Path, two: Path, formats: tuple[str, ...] = ("nested", "sliced"),
                          tolerance: float = TOLERANCE) -> None:
    for tables in ("state", "nested"):  # the width tables: the hand-off state's and the artifact's
        with safe_open(str(one / tables / WIDTHS_FILE), "pt") as a, safe_open(str(two / tables / WIDTHS_FILE), "pt") as b:
            assert torch.equal(a.get_tensor("widths"), b.get_tensor("widths")), tables
    for fmt in formats:
        ta, tb = _tensors(one / fmt), _tensors(two / fmt)
        assert ta and set(ta) == set(tb), sorted(set(ta) ^ set(tb))[:5]
        for name in ta:
            assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
            diff = float((ta[name].double() - tb[name].double()).abs().max()) if ta[name].numel() else 0.0
            assert diff <= tolerance, f"{fmt}/{name}: max difference {diff:.3g}"


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


@pytest.fixture(scope="module")
def one_process_anneal(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process") / "anneal"
    flexc.compile(_anneal_spec(tiny_model_dir), out=out, quiet=True)
    return out


def _anneal_report(out: Path) -> tuple[dict, list[dict]]:
    stage = next((out / "stages").glob("*-anneal"))
    return json.loads((stage / "width_tables.json").read_text()), json.loads((stage / "anneal_history.json").read_text())


def assert_same_anneal(one: Path, two: Path) -> None:
    assert_same_artifacts(one, two, formats=("nested",))
    (tables, history), (tables2, history2) = _anneal_report(one), _anneal_report(two)
    hows = [b["how"] for b in tables["budgets"]]
    assert hows == [b["how"] for b in tables2["budgets"]] and all(h.startswith("trained") for h in hows)
    # the held-out check's early looks see every rank's losses: the ranks stop where one process does
    assert [b["held_out_read"] for b in tables["budgets"]] == [b["held_out_read"] for b in tables2["budgets"]]
    for b, b2 in zip(tables["budgets"], tables2["budgets"]):  # held out: every rank's sequences, in order
        assert b2["validation_loss"] == pytest.approx(b["validation_loss"], rel=ANNEAL_RTOL)
    assert len(history) == len(history2) == 8
    for h, h2 in zip(history, history2):  # quality: summed over the ranks' shares of each batch
        assert h2 == pytest.approx(h, rel=ANNEAL_RTOL), h["step"]


def straight_through(spec: Path, reference: Path, tmp_path: Path, **env: str) -> Path:
    """Compile ``spec`` under torchrun: rank 0 writes the files one process wrote to ``reference``, and no rank
    leaves a scratch folder behind. Returns the output."""
    out = tmp_path / "out"
    done, _ = torchrun(spec, out, tmp_path / "tmp", **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _files(out) == _files(reference)
    assert not list((tmp_path / "tmp").glob("flexc-rank*"))
    return out


def test_two_processes_anneal_as_one_process_does(one_process_anneal, tiny_model_dir, tmp_path):
    spec = _write(_anneal_spec(tiny_model_dir), tmp_path / "spec.yaml")
    assert_same_anneal(one_process_anneal, straight_through(spec, one_process_anneal, tmp_path))


def test_two_processes_anneal_streamed_as_one_process_does(tiny_model_dir, tmp_path):
    """The layer-streamed anneal under torchrun: each rank streams its share of every batch through the
    layers (forward and recomputing backward), the gates' gradients summed every step."""
    one = tmp_path / "one"
    flexc.compile(_anneal_spec(tiny_model_dir, stream="layers"), out=one, quiet=True)
    spec = _write(_anneal_spec(tiny_model_dir, stream="layers"), tmp_path / "spec.yaml")
    assert_same_anneal(one, straight_through(spec, one, tmp_path))


def kill_then_resume(spec: Path, tmp_path: Path, stage: str, kill_step: int, checkpointed: int) -> Path:
    """Rank 1 dies after step ``kill_step`` of the training pass in ``stage`` (``NN-name``): the run fails there,
    with rank 0's checkpoint of ``checkpointed`` steps; the same command then resumes from it. Returns the output."""
    out, name = tmp_path / "out", stage.split("-", 1)[1]
    done, _ = torchrun(spec, out, tmp_path / "tmp", FLEXC_TEST_KILL_RANK="1", FLEXC_TEST_KILL_STEP=str(kill_step))
    assert done.returncode != 0
    failed = [s for s in json.loads((out / "manifest.json").read_text())["stages"] if s["status"] == "failed"]
    assert [s["name"] for s in failed] == [stage]
    assert not (out / "nested").exists()
    assert torch.load(out / "stages" / stage / f"{name}_checkpoint.pt", weights_only=True)["step"] == checkpointed

    done, _ = torchrun(spec, out, tmp_path / "tmp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{name}: resuming from step {checkpointed}" in (out / "compile.log").read_text()
    return out


def test_a_rank_killed_mid_anneal_resumes_from_rank_0s_checkpoint(one_process_anneal, tiny_model_dir, tmp_path):
    spec = _write(_anneal_spec(tiny_model_dir, kill=True), tmp_path / "spec.yaml")
    # rank 1 dies after step 6 (of 8): rank 0 checkpointed step 6 before it joined that step's sum
    out = kill_then_resume(spec, tmp_path, "04-anneal", kill_step=6, checkpointed=6)
    assert_same_anneal(one_process_anneal, out)  # rank 1 resumed from rank 0's checkpoint too


@pytest.fixture(scope="module")
def one_process_recover(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process") / "recover"
    flexc.compile(_recover_spec(tiny_model_dir), out=out, quiet=True)
    return out


def _recover_history(out: Path) -> list[dict]:
    return json.loads((next((out / "stages").glob("*-recover")) / "recover_history.json").read_text())


def assert_same_recover(one: Path, two: Path) -> None:
    assert_same_artifacts(one, two, formats=("nested",), tolerance=RECOVER_ATOL)
    history, history2 = _recover_history(one), _recover_history(two)
    assert [h["step"] for h in history] == [h["step"] for h in history2] == [0, 1, 2, 3]
    for h, h2 in zip(history, history2):  # the loss: summed over the ranks' shares of each batch
        assert h2 == pytest.approx(h, rel=RECOVER_RTOL), h["step"]


def test_two_processes_recover_as_one_process_does(one_process_recover, tiny_model_dir, tmp_path):
    spec = _write(_recover_spec(tiny_model_dir), tmp_path / "spec.yaml")
    assert_same_recover(one_process_recover, straight_through(spec, one_process_recover, tmp_path))


def test_two_processes_recover_streamed_as_one_process_does(tiny_model_dir, tmp_path):
    """The layer-streamed recover under torchrun: each rank streams its share of every batch through the
    layers (teacher and student forward, recomputing backward), the adapters' gradients summed every step,
    here one gradient at a time in place (the reduction large adapters take; the in-memory test above
    sums the small ones in one collective)."""
    one = tmp_path / "one"
    flexc.compile(_recover_spec(tiny_model_dir, stream="layers"), out=one, quiet=True)
    spec = _write(_recover_spec(tiny_model_dir, stream="layers"), tmp_path / "spec.yaml")
    assert_same_recover(one, straight_through(spec, one, tmp_path, FLEXC_PACKED_REDUCTION_LIMIT="0"))


def test_a_rank_killed_mid_recover_resumes_from_rank_0s_checkpoint(one_process_recover, tiny_model_dir, tmp_path):
    spec = _write(_recover_spec(tiny_model_dir, kill=True), tmp_path / "spec.yaml")
    # rank 1 dies after step 1 (the second of 4): rank 0 checkpointed 2 steps before the next step's sum
    out = kill_then_resume(spec, tmp_path, "05-recover", kill_step=1, checkpointed=2)
    assert_same_recover(one_process_recover, out)  # rank 1 resumed from rank 0's checkpoint too


# --------------------------------------------------------------------------- without torchrun


@pytest.fixture
def two_ranks(monkeypatch):
    """This process pretends to be rank 1 of 2 (for the checks that need no peer)."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)


def test_an_empty_pipeline_and_one_gpu_for_every_rank_are_refused_under_torchrun(two_ranks, tiny_model_dir):
    spec = _spec(tiny_model_dir, "taylor")
    spec["pipeline"] = [{"rank_channels": {"score": "taylor"}}, "insert_action_gates", "anneal", "fold_masks",
                        "recover"]
    check_data_parallel(Spec.model_validate(spec))  # both training passes run data-parallel
    with pytest.raises(FlexcError, match="2 processes.*nothing to split"):
        check_data_parallel(Spec.model_validate({**spec, "pipeline": []}))
    with pytest.raises(FlexcError, match="model.device 'cuda:1' puts every rank on one GPU"):
        check_data_parallel(Spec.model_validate({**spec, "model": {**spec["model"], "device": "cuda:1"}}))
    check_data_parallel(Spec.model_validate(_spec(tiny_model_dir, "activation")))  # what the tests above run


def test_batches_are_dealt_round_robin(two_ranks):
    assert list(distributed.shard(range(5))) == [1, 3]
    assert len(distributed.shard(range(5))) == 2
    with pytest.raises(FlexcError, match="1 calibration batch"):
        distributed.shard(range(1))


def test_anneal_splits_every_batch_into_contiguous_shares(two_ranks):
    assert distributed.row_share(5, "batch 1") == slice(2, 5)  # rank 0 gets rows 0-1: in rank order, the batch
    with pytest.raises(FlexcError, match="batch 3 has 1 sequence.s. for 2 ranks.*raise data.calibration.batch_size"):
        distributed.row_share(1, "batch 3")


def test_a_bad_timeout_is_a_user_error(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(FlexcError, match="FLEXC_DIST_TIMEOUT must be a positive number of seconds; found 'soon'"):
        distributed.timeout_seconds()


@pytest.mark.parametrize("stream", ["off", "layers"], ids=["in-memory", "streamed"])
def test_two_processes_quantize_as_one_process_does(stream, tiny_model_dir, tmp_path):
    """quantize's GPTQ Hessians are summed over the ranks' calibration shares (streamed: layer by layer): both
    processes write the quantized weights one process writes (codes and scales, nested and sliced)."""
    spec = {**_spec(tiny_model_dir, "taylor", stream=stream), "budgets": {"keep": [0.75, 0.5], "grid": 32},
            "pipeline": [{"rank_channels": {"score": "taylor", "plot": False}}, {"uniform": {"granule": 32}},
                         {"quantize": {"scheme": "w4a16", "group_size": 32, "method": "gptq"}}]}
    flexc.compile(spec, out=tmp_path / "one", quiet=True)
    done, _ = torchrun(_write(spec, tmp_path / "spec.yaml"), tmp_path / "two", tmp_path / "tmp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_artifacts(tmp_path / "one", tmp_path / "two")
