"""lm-eval-harness tasks on flexc-loaded models, checked against a hand computation."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import flexc  # noqa: E402
from flexc.cli import main  # noqa: E402
from flexc.compiler.errors import FlexcError  # noqa: E402
from flexc.eval.harness import harness_model, load_task_file, run_tasks  # noqa: E402

TASK = Path(__file__).parent / "data" / "lm_eval" / "stdlib_completion.yaml"


def hand_accuracy(model, tokenizer) -> dict[str, float]:
    """acc / acc_norm of the local task, computed directly: the choice whose tokens (after the
    context's) have the highest summed log-probability, raw and per byte of the choice."""
    docs = [json.loads(line) for line in (TASK.parent / "stdlib_completion.jsonl").read_text().splitlines()]
    hits = {"acc": 0, "acc_norm": 0}
    for doc in docs:
        context = doc["context"]
        moved = context[len(context.rstrip()):]  # trailing whitespace belongs to the continuation
        context = context.rstrip()
        scores = []
        for choice in doc["choices"]:
            # lm-eval's pairing: the context's own tokens, then the whole string's tokens past them
            ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            cont_ids = tokenizer(context + moved + choice, add_special_tokens=False)["input_ids"][len(ctx_ids):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx_ids + cont_ids])).logits[0].float(), -1)
            scores.append(sum(logp[len(ctx_ids) + j - 1, t].item() for j, t in enumerate(cont_ids)))
        lengths = [len(c.encode()) for c in doc["choices"]]
        hits["acc"] += int(max(range(3), key=lambda i: scores[i]) == doc["label"])
        hits["acc_norm"] += int(max(range(3), key=lambda i: scores[i] / lengths[i]) == doc["label"])
    return {k: v / len(docs) for k, v in hits.items()}


def as_dict(rows):
    return {r["metric"]: r["value"] for r in rows}


def test_local_task_on_a_base_model_matches_hand_computation(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = run_tasks(harness_model(model, tokenizer), [str(TASK)])
    assert {r["task"] for r in rows} == {"stdlib_completion"}
    assert as_dict(rows) == pytest.approx(hand_accuracy(model, tokenizer))
    assert all(r["stderr"] is not None and r["stderr"] > 0 for r in rows)


@pytest.fixture(scope="module")
def nested_artifact(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("harness") / "run"
    data = {"builtin": "python-stdlib", "num_samples": 8, "seq_len": 64, "batch_size": 4}
    flexc.compile({
        "model": {"path": str(tiny_model_dir)},
        "data": {"calibration": {**data, "split": "train"}},
        "budgets": {"keep": [0.5, 0.25]},
        "pipeline": [{"rank_channels": {"score": "activation", "plot": False}}, "uniform", "fold_masks"],
        "export": {"formats": ["nested"]},
    }, out=out, quiet=True)
    return out / "nested"


def test_cli_runs_the_task_at_each_budget_of_a_nested_artifact(nested_artifact, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "r.json"
    argv = ["eval", str(nested_artifact), "--tasks", str(TASK), "--budget", "1", "--budget", "0.25",
            "--no-perplexity", "--json", str(out), "-q"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["perplexity"] == []
    tokenizer = AutoTokenizer.from_pretrained(nested_artifact)
    expected = {b: hand_accuracy(flexc.load(nested_artifact, budget=b), tokenizer) for b in (1.0, 0.25)}
    assert expected[1.0] != expected[0.25]  # so a budget switch the harness missed would show
    for budget in (1.0, 0.25):
        rows = [r for r in result["tasks"] if r["budget"] == budget]
        assert as_dict(rows) == pytest.approx(expected[budget])


def test_task_errors_are_clear(tmp_path, tiny_model_dir):
    with pytest.raises(FlexcError, match="does not exist"):
        load_task_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: x\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: nowhere.jsonl\n")
    with pytest.raises(FlexcError, match="data file 'nowhere.jsonl' not found"):
        load_task_file(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(FlexcError, match="a mapping with a 'task' name"):
        load_task_file(bad)
    # a bad task is refused before any model loads; an unknown registry name names itself
    assert main(["eval", str(tiny_model_dir), "--tasks", str(bad), "-q"]) == 2
    assert main(["eval", str(tiny_model_dir), "--tasks", "no_such_task_xyz", "--no-perplexity", "-q"]) == 2
    assert main(["eval", str(tiny_model_dir), "--no-perplexity", "-q"]) == 2
