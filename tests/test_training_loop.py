"""The one training loop (flexc.utils.training.TrainingRun): the order it runs a method's steps in,
when it checkpoints, how it resumes and stops, and what it sums in one process."""

from __future__ import annotations

import logging

import pytest
import torch

from flexc.utils.checkpoint import CheckpointError, TrainingDiverged
from flexc.utils.training import TrainingRun, restore


def _run(tmp_path, fingerprint="f1", every=3, path=True) -> TrainingRun:
    return TrainingRun("toy", tmp_path / "toy.pt" if path else None, fingerprint, every=every,
                       logger=logging.getLogger("test"), quiet=True)


def _train(run: TrainingRun, start: int, total: int, events: list, param: torch.Tensor, until=None) -> int:
    def step(i: int) -> dict:
        events.append(("step", i))
        param.add_(1.0)
        return {"loss": float(i)}

    with run.progress(start, total) as bar:
        return run.steps(step, start, total, bar=bar, until=until,
                         save=lambda done: (events.append(("save", done)), run.save(done, param=param.clone())),
                         on_step=lambda i: events.append(("hook", i)))


def test_steps_run_in_order_and_checkpoint_when_due(tmp_path):
    events: list = []
    done = _train(_run(tmp_path), 0, 7, events, torch.zeros(2))
    assert done == 7
    expected = []
    for i in range(7):
        expected.append(("step", i))
        if (i + 1) % 3 == 0:
            expected.append(("save", i + 1))  # after the step, before its hook
        expected.append(("hook", i))
    assert events == expected
    assert torch.load(tmp_path / "toy.pt", weights_only=True)["step"] == 6


def test_a_run_resumes_from_its_checkpoint_and_ignores_another_runs(tmp_path):
    param = torch.zeros(2)
    _train(_run(tmp_path), 0, 4, [], param)  # checkpoint at step 3: param was 3
    restored = torch.zeros(2)
    ckpt = _run(tmp_path).resume(lambda c: restore([restored], [c["param"]]))
    assert ckpt["step"] == 3 and restored.tolist() == [3.0, 3.0]
    events: list = []
    assert _train(_run(tmp_path), ckpt["step"], 7, events, restored) == 7
    assert [e for e in events if e[0] == "step"] == [("step", i) for i in range(3, 7)]
    assert restored.tolist() == [7.0, 7.0]  # as an uninterrupted run of 7 steps
    assert _run(tmp_path, fingerprint="other").resume() is None  # other options: started over


def test_a_checkpoint_that_does_not_fit_is_an_error_naming_it(tmp_path):
    _train(_run(tmp_path), 0, 3, [], torch.zeros(2))
    with pytest.raises(CheckpointError, match="toy.pt: does not fit this toy run"):
        _run(tmp_path).resume(lambda c: restore([torch.zeros(5)], [c["param"]]))


def test_until_stops_before_a_step(tmp_path):
    events: list = []
    done = _train(_run(tmp_path), 0, 10, events, torch.zeros(1),
                  until=lambda: sum(e[0] == "step" for e in events) >= 2)
    assert done == 2 and [e for e in events if e[0] == "step"] == [("step", 0), ("step", 1)]


def test_a_run_without_a_checkpoint_file_never_saves(tmp_path):
    run = _run(tmp_path, path=False)
    events: list = []
    assert _train(run, 0, 6, events, torch.zeros(1)) == 6
    assert not [e for e in events if e[0] == "save"] and run.resume() is None
    assert not list(tmp_path.iterdir())


def test_in_one_process_the_sum_over_ranks_is_the_loss_and_the_gradients_as_they_are():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = (w * w).sum()
    loss.backward()
    whole = TrainingRun("toy", None, quiet=True).sum_over_ranks(loss, [w], "the toy loss")
    assert whole.item() == pytest.approx(5.0) and not whole.requires_grad
    assert w.grad.tolist() == [2.0, 4.0]


def test_a_non_finite_loss_stops_the_run_saying_what_to_change(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(TrainingDiverged, match=r"toy: the loss became nan at step 4 \(q 1\); the last good "
                                               r"checkpoint is kept at .*toy.pt\. Lower lr"):
        run.check_finite(torch.tensor(float("nan")), "the loss", 4, detail="q 1")
    with pytest.raises(TrainingDiverged, match="the weights became non-finite after the update of step 2"):
        run.check_finite_params([torch.tensor([float("inf")])], "the weights", 2)
