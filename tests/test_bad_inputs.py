"""Bad input battery: every mistake is caught before any weight loads.

Each case writes one bad spec (and whatever bad data, model or artifact file it needs) and runs
it through the CLI, as ``validate`` and as ``compile``. Each must exit with status 2, print no
traceback, name the spec file and the field (and the offending file where there is one), and
leave no output directory behind that would block the corrected spec.

Models are the tiny random ones of :mod:`flexc.ir.testing` saved to a temporary directory;
nothing here loads weights (the safetensors cases read headers only) or trains a zoo model (a
zoo case reads its recipe or cached config).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, get_args, get_origin

import pytest

from flexc.cli import main

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "broken_specs"))
import compiler_helpers as helpers  # noqa: E402

CAL = "data:\n  calibration: {builtin: python-stdlib, num_samples: 4, seq_len: 32, batch_size: 2}\n"
GATES = "pipeline: [rank_channels, insert_action_gates, anneal, fold_masks]\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Model directories: ``moe`` (qwen3_moe, experts of 32 channels, tokenizer), ``moe56`` (experts of
    56 channels, tokenizer), ``bare`` (no tokenizer), ``dense`` (a Llama)."""
    root = tmp_path_factory.mktemp("models")
    moe = helpers.make_tiny_moe(root / "moe")
    from flexc.ir.testing import tiny_model

    moe56 = root / "moe56"
    tiny_model("qwen3_moe", moe_intermediate_size=56, vocab_size=300).save_pretrained(moe56)
    bare = root / "bare"
    shutil.copytree(moe56, bare)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(moe / f, moe56 / f)
    return {"moe": moe, "moe56": moe56, "bare": bare, "dense": helpers.make_dense(root / "dense")}


@dataclass
class Case:
    """A bad spec (a template: {moe}, {moe56}, {bare}, {dense}, {model} and {tmp} are filled in)."""

    id: str
    spec: str
    field: str | None  # the spec field the message must name (None: the file as a whole)
    says: str  # a piece of the message
    setup: Callable[[Path, pytest.MonkeyPatch], None] | None = None  # writes files, patches the machine
    names_file: str | None = None  # a file (relative to tmp) the message must also name
    extra: dict = field(default_factory=dict)


def model_case(id, make, says, field="model.path", names_file=None, spec="model: {path: {model}}\n"):
    """A corrupt model directory {model} (a copy of the tiny MoE model, then ``make(dir)``)."""

    def setup(tmp, mp, make=make):
        shutil.copytree(_MODELS["moe"], tmp / "model")
        make(tmp / "model")

    return Case(id, spec, field, says, setup, names_file)


def data_case(id, name, content: bytes | str | Callable, says, role="calibration", text_field=None, n=4, seq=32,
              field=None):
    """A bad data file {tmp}/name used as the calibration (or evaluation) source of the tiny model."""

    def setup(tmp, mp):
        p = tmp / name
        if callable(content):
            content(p)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)

    tf = f", text_field: {text_field}" if text_field else ""
    spec = (f"model: {{path: {{moe}}}}\ndata:\n  {role}: {{files: [{{tmp}}/{name}], num_samples: {n}, "
            f"seq_len: {seq}{tf}}}\n")
    if role == "calibration":
        spec += "budgets: {keep: [0.75]}\npipeline: [rank_channels]\n"
    return Case(id, spec, field or f"data.{role}.files[0]", says, setup, name)


def _parquet(columns: dict) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), str(p))

    return write


def _truncate(p: Path) -> None:
    f = p / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _header(p: Path, header, length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    (p / "model.safetensors").write_bytes(struct.pack("<Q", length if length is not None else len(raw)) + raw)


def _drop_tensors(p: Path, *names: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(p / "model.safetensors"))
    for name in names:
        del tensors[name]
    save_file(tensors, str(p / "model.safetensors"), metadata={"format": "pt"})


def _no_cuda(tmp, mp):
    import torch

    mp.setattr(torch.cuda, "is_available", lambda: False)


def _no_mps(tmp, mp):
    import torch

    mp.setattr(torch.backends.mps, "is_available", lambda: False)


def _triton(available: bool):
    def setup(tmp, mp):
        from flexc.kernels import dispatch

        mp.setattr(dispatch, "triton_available", lambda: available)
        mp.delenv("TRITON_INTERPRET", raising=False)

    return setup


def _unbuilt_zoo(tmp, mp):
    """The zoo cache is empty: checks read the recipe, and nothing is trained."""
    import dataclasses

    from flexc import zoo

    real = zoo.available
    mp.setattr(zoo, "available", lambda: [dataclasses.replace(e, cached=False) for e in real()])
    mp.setattr(zoo, "build", lambda *a, **k: pytest.fail("a validation must not train a zoo model"))


def _without(*packages):
    """Optional packages look uninstalled (to the checks' importlib.util.find_spec)."""

    def setup(tmp, mp):
        import importlib.util

        real = importlib.util.find_spec
        mp.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name in packages else real(name, *a, **k))

    return setup


def _write(name: str, content: str | bytes):
    def setup(tmp, mp):
        (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def _scores(shape, key="layer{i}.perm"):
    """A channel_scores.safetensors in {tmp} (what rank_channels' ``from:`` reads) with perms of ``shape``."""

    def setup(tmp, mp):
        import torch
        from safetensors.torch import save_file

        save_file({key.format(i=i): torch.zeros(shape, dtype=torch.int64) for i in range(2)},
                  str(tmp / "channel_scores.safetensors"))

    return setup


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _one_cuda_device(tmp, mp):
    import torch

    mp.setattr(torch.cuda, "is_available", lambda: True)
    mp.setattr(torch.cuda, "device_count", lambda: 1)


def anchor_bomb(levels: int = 9, fanout: int = 10) -> str:
    """A spec of about 1 KB whose nested anchors expand to ``fanout ** levels`` values (10^9)."""
    lines = ["model: {zoo: tiny}", "l0: &l0 [" + ", ".join(["x"] * fanout) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fanout) + "]")
    return "\n".join(lines) + f"\nseed: *l{levels - 1}\n"


_MODELS: dict[str, Path] = {}
MOE = "model: {path: {moe}}\n"
MOE_CAL = MOE + CAL
NOT_JSON = "{not json"
MODEL_CAL = "model: {path: {model}}\n" + CAL + "budgets: {keep: [0.5]}\npipeline: [rank_channels]\n"

CASES = [
    # ---- budgets the width passes cannot reach
    Case("budget_below_action_floor", "model: {path: {moe56}}\n" + CAL + "budgets: {keep: [0.5, 0.25]}\n" + GATES,
         "budgets.keep[1]", "below 0.286"),
    Case("budget_below_floor_prune_form", MOE_CAL + "budgets: {prune: [0.2, 0.7]}\n" + GATES,
         "budgets.prune[1]", "lowest keep reachable"),
    Case("anneal_budgets_option_below_floor", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, "
         "insert_action_gates, {anneal: {budgets: [0.75, 0.3]}}]\n", "pipeline[2]", "keep 0.3 is below 0.5"),
    Case("granule_wider_than_experts", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, "
         "{insert_action_gates: {granule: 64}}, anneal]\n", "pipeline[1]", "granule 64 is wider than the experts"),
    Case("uniform_below_granule_floor", MOE_CAL + "budgets: {keep: [0.75, 0.25]}\npipeline: [rank_channels, uniform]\n",
         "budgets.keep[1]", "uniform (granule 16)"),
    Case("coverage_option_budget_below_floor", MOE_CAL + "pipeline: [rank_channels, {coverage: {budgets: [0.4]}}]\n",
         "pipeline[1]", "coverage (granule 16)"),
    Case("expert_prune_below_top_k", MOE_CAL + "budgets: {keep: [0.5, 0.2]}\npipeline: [expert_prune]\n",
         "budgets.keep[1]", "top_k=2 of the 8 experts"),
    # ---- exports the pipeline cannot feed
    Case("nested_without_width_pass", MOE_CAL + "budgets: {keep: [0.5]}\npipeline: [rank_channels]\n"
         "export: {formats: [nested]}\n", "export.formats[0]", "no pass in the pipeline chooses widths"),
    Case("sliced_with_empty_pipeline", MOE + "export: {formats: [hf, sliced]}\n", "export.formats[1]",
         "needs width tables"),
    Case("onnx_without_width_pass", MOE_CAL + "budgets: {keep: [0.5]}\npipeline: [rank_channels]\n"
         "export: {formats: [onnx]}\n", "export.formats[0]", "needs width tables"),
    Case("nested_with_expert_prune", MOE_CAL + "budgets: {keep: [0.5]}\npipeline: [expert_prune]\n"
         "export: {formats: [nested]}\n", "export.formats[0]", "whole-expert pruning"),
    Case("sliced_with_expert_prune", MOE_CAL + "budgets: {keep: [0.5]}\npipeline: [expert_prune]\n"
         "export: {formats: [sliced]}\n", "export.formats[0]", "whole-expert pruning"),
    Case("hf_with_expert_prune", MOE_CAL + "budgets: {keep: [0.5]}\npipeline: [expert_prune]\n"
         "export: {formats: [hf]}\n", "export.formats[0]", "whole-expert pruning"),
    Case("graph_with_empty_pipeline", MOE + "export: {formats: [graph]}\n", "export.formats[0]", "never lowers"),
    Case("onnx_packages_missing", MOE_CAL + "budgets: {keep: [0.5]}\npipeline: [rank_channels, uniform]\n"
         "export: {formats: [onnx]}\n", "export.formats[0]", "needs onnx, onnxruntime, onnxscript",
         _without("onnx", "onnxruntime", "onnxscript")),
    Case("recover_without_peft", MOE_CAL + "budgets: {keep: [0.6]}\npipeline: [rank_channels, uniform, recover]\n",
         "pipeline[2]", "'recover' needs peft", _without("peft")),
    Case("format_listed_twice", MOE + "export: {formats: [hf, hf]}\n", "export.formats[1]", "listed twice"),
    Case("unknown_format", MOE + "export: {formats: [gguf]}\n", "export.formats[0]", "expected one of"),
    # ---- passes without what they read
    Case("rank_without_calibration", MOE + "budgets: {keep: [0.5]}\npipeline: [rank_channels]\n", "pipeline[0]",
         "reads calibration data, and the spec has none"),
    Case("expert_prune_without_calibration", MOE + "budgets: {keep: [0.5]}\npipeline: [expert_prune]\n",
         "pipeline[0]", "reads calibration data"),
    Case("recover_without_calibration", MOE + "budgets: {keep: [0.6]}\npipeline: [{rank_channels: {from: {tmp}}}, "
         "uniform, recover]\n", "pipeline[2]", "'recover' reads calibration data", _scores([8, 32])),
    Case("scores_from_truncated", MOE + "budgets: {keep: [0.6]}\npipeline: [{rank_channels: {from: {tmp}}}, uniform]\n",
         "pipeline[0]", "truncated safetensors", _write("channel_scores.safetensors", b""),
         "channel_scores.safetensors"),
    Case("scores_from_other_model", MOE + "budgets: {keep: [0.6]}\npipeline: [{rank_channels: {from: {tmp}}}, "
         "uniform]\n", "pipeline[0]", "scores of another model?", _scores([8, 64])),
    Case("scores_from_not_a_ranking", MOE + "budgets: {keep: [0.6]}\npipeline: [{rank_channels: {from: {tmp}}}, "
         "uniform]\n", "pipeline[0]", "no channel ranking", _scores([8, 32], key="weight")),
    Case("calibration_without_tokenizer", "model: {path: {bare}}\n" + CAL + "budgets: {keep: [0.5]}\n"
         "pipeline: [rank_channels]\n", "model.path", "no tokenizer files"),
    Case("recover_keep_far_from_budgets", MOE_CAL + "budgets: {keep: [0.9, 0.5]}\npipeline: [rank_channels, uniform, "
         "recover]\n", "pipeline[2]", "recover's keep 0.6 is not within keep_tolerance 0.05"),
    model_case("tokenizer_without_eos", lambda p: _edit_json(p / "tokenizer_config.json", eos_token=None),
               "no end-of-text token", spec=MODEL_CAL),
    model_case("tokenizer_corrupt", lambda p: (p / "tokenizer.json").write_text(NOT_JSON), "cannot be loaded",
               spec=MODEL_CAL),
    Case("anneal_without_budgets", MOE_CAL + "pipeline: [rank_channels, insert_action_gates, anneal]\n",
         "pipeline[2]", "'anneal' needs budgets"),
    Case("uniform_without_budgets", MOE_CAL + "pipeline: [rank_channels, uniform]\n", "pipeline[1]",
         "'uniform' needs budgets"),
    Case("pipeline_order", MOE_CAL + "budgets: {keep: [0.5]}\npipeline: [insert_action_gates, rank_channels]\n",
         "pipeline[0]", "pass order"),
    Case("unknown_pass", MOE + "pipeline: [rank_chanels]\n", "pipeline[0]", "rank_channels"),
    Case("custom_score_module_missing", MOE_CAL + "pipeline: [{rank_channels: {score: 'no_such_mod_xyz:Score'}}]\n",
         "pipeline[0].rank_channels.score", "cannot import score 'no_such_mod_xyz:Score'"),
    Case("custom_score_class_missing", MOE_CAL + "pipeline: [{rank_channels: {score: 'flexc.passes.scores:Nope'}}]\n",
         "pipeline[0].rank_channels.score", "AttributeError"),
    Case("custom_score_not_a_score", MOE_CAL + "pipeline: [{rank_channels: {score: "
         "'flexc.passes.scores:resolve_score'}}]\n", "pipeline[0].rank_channels.score", "not a flexc.passes.scores"),
    Case("lower_kernels_triton_on_cpu", MOE + "pipeline: [{lower_kernels: {backend: triton}}]\n", "pipeline[0]",
         "needs CUDA tensors", _triton(True)),
    Case("lower_kernels_triton_missing", MOE + "pipeline: [{lower_kernels: {backend: triton}}]\n", "pipeline[0]",
         "needs the triton package", _triton(False)),
    # ---- option values: booleans for numbers, non-finite floats, overflowing seeds
    Case("seed_overflows", MOE + "seed: 18446744073709551616\n", "seed", "less than or equal to 9223372036854775807"),
    Case("seed_negative", MOE + "seed: -1\n", "seed", "greater than or equal to 0"),
    Case("seed_bool", MOE + "seed: true\n", "seed", "expected a number; found true"),
    Case("num_samples_bool", MOE + "data:\n  calibration: {builtin: python-stdlib, num_samples: true}\n",
         "data.calibration.num_samples", "expected a number; found true"),
    Case("batch_size_bool", MOE + "data:\n  evaluation: {builtin: python-stdlib, batch_size: false}\n",
         "data.evaluation.batch_size", "found false"),
    Case("keep_ratio_bool", MOE + "budgets: {keep: [true]}\n", "budgets.keep", "found true"),
    Case("keep_ratios_equal_to_two_decimals", MOE + "budgets: {keep: [0.501, 0.5]}\n", "budgets.keep[1]",
         "0.501 and 0.5 are one budget to two decimals (both would be written to keep_0.50/)"),
    Case("prune_ratios_equal_to_two_decimals", MOE + "budgets: {prune: [0.3, 0.304]}\n", "budgets.prune[1]",
         "0.3 and 0.304 are one budget to two decimals (both would be written to keep_0.70/)"),
    Case("keep_ratios_mixed_with_a_quoted_number", MOE + "budgets: {keep: [0.5, \"0.3\"]}\n", "budgets.keep",
         "found the string '0.3' (remove the quotes) at position 1"),
    Case("fold_masks_twice", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, insert_action_gates, "
         "anneal, fold_masks, fold_masks]\n", "pipeline[4]", "pass 'fold_masks' is listed twice (pipeline[3] and "
         "pipeline[4])"),
    Case("rank_channels_twice", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, rank_channels, "
         "uniform]\n", "pipeline[1]", "a built-in pass runs once"),
    Case("anneal_steps_a_billion", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, "
         "insert_action_gates, {anneal: {steps: 1000000000}}]\n", "pipeline[2].anneal.steps",
         "less than or equal to 1000000; found 1000000000"),
    Case("anneal_teacher_topk_beyond_the_vocabulary", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, "
         "insert_action_gates, {anneal: {teacher_topk: 1000000000000}}]\n", "pipeline[2].anneal.teacher_topk",
         "teacher_topk 1000000000000 exceeds the vocabulary (290 tokens"),
    Case("uniform_granule_not_a_power_of_two", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, "
         "{uniform: {granule: 3}}]\n", "pipeline[1].uniform.granule", "power of two (kernel tiles); found 3"),
    Case("gates_init_margin_huge", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, "
         "{insert_action_gates: {init_margin: 1.0e300}}, anneal]\n", "pipeline[1].insert_action_gates.init_margin",
         "less than or equal to 50; found 1e+300"),
    Case("recover_targets_empty", MOE_CAL + "budgets: {keep: [0.6]}\npipeline: [rank_channels, uniform, "
         "{recover: {targets: []}}]\n", "pipeline[2].recover.targets", "expected at least 1 item(s); found 0"),
    Case("anneal_lr_inf", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, insert_action_gates, "
         "{anneal: {lr: .inf}}]\n", "pipeline[2].anneal.lr", "expected a finite number; found inf"),
    Case("anneal_steps_bool", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, insert_action_gates, "
         "{anneal: {steps: true}}]\n", "pipeline[2].anneal.steps", "found true"),
    Case("anneal_schedule_nan", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, insert_action_gates, "
         "{anneal: {schedule: {tau: {start: .nan, end: 0.1}}}}]\n", "pipeline[2].anneal.schedule.tau.start",
         "finite number"),
    Case("anneal_flat_option_of_an_earlier_release", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, "
         "insert_action_gates, {anneal: {validation_z: 2}}]\n", "pipeline[2].anneal",
         "validation_z -> selection: {z: ...}"),
    Case("anneal_budget_option_out_of_range", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, "
         "insert_action_gates, {anneal: {budgets: [1.5]}}]\n", "pipeline[2].anneal.budgets", "(0, 1]"),
    Case("recover_lr_nan", MOE_CAL + "budgets: {keep: [0.5]}\npipeline: [rank_channels, uniform, "
         "{recover: {lr: .nan}}]\n", "pipeline[2].recover.lr", "finite number"),
    Case("recover_grad_norm_inf", MOE_CAL + "budgets: {keep: [0.5]}\npipeline: [rank_channels, uniform, "
         "{recover: {max_grad_norm: .inf}}]\n", "pipeline[2].recover.max_grad_norm", "finite number"),
    Case("gates_init_margin_inf", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, "
         "{insert_action_gates: {init_margin: .inf}}, anneal]\n", "pipeline[1].insert_action_gates.init_margin",
         "finite number"),
    Case("coverage_exponent_nan", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, "
         "{coverage: {exponent: .nan}}]\n", "pipeline[1].coverage.exponent", "finite number"),
    Case("uniform_budget_option_zero", MOE_CAL + "pipeline: [rank_channels, {uniform: {budgets: [0]}}]\n",
         "pipeline[1].uniform.budgets", "(0, 1]"),
    Case("gates_levels_bool", MOE_CAL + "budgets: {keep: [0.75]}\npipeline: [rank_channels, "
         "{insert_action_gates: {levels: true}}, anneal]\n", "pipeline[1].insert_action_gates.levels", "found true"),
    # ---- data files
    data_case("data_empty", "empty.txt", b"", "is empty"),
    data_case("data_whitespace_only", "blank.txt", "\n\n   \n", "only whitespace"),
    data_case("data_binary_txt", "weights.txt", b"\x00\x01\x02" * 100, "binary file"),
    data_case("data_gzip_jsonl", "c.jsonl", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\x00" * 40, "binary file"),
    data_case("data_not_utf8", "latin.txt", "caf\xe9 cr\xe8me ".encode("latin-1") * 10, "not UTF-8"),
    data_case("data_jsonl_not_json", "d.jsonl", "this is not json\n", "line 1 is not JSON"),
    data_case("data_jsonl_bad_second_line", "d2.jsonl", '{"text": "a"}\n{"text": \n', "line 2 is not JSON"),
    data_case("data_jsonl_missing_field", "f.jsonl", '{"content": "def f(): pass"}\n', "no 'text' field"),
    data_case("data_jsonl_custom_field_missing", "g.jsonl", '{"text": "x"}\n', "no 'body' field", text_field="body"),
    data_case("data_jsonl_record_is_string", "s.jsonl", '"def f(): pass"\n', "record 1 is a string"),
    data_case("data_json_record_is_list", "l.json", '[["a"], ["b"]]', "record 1 is a JSON list"),
    data_case("data_jsonl_text_is_number", "n.jsonl", '{"text": 12}\n', "is a number; expected a string"),
    data_case("data_json_invalid", "j.json", '[{"text": "a"}, {"text": ', "not valid JSON"),
    data_case("data_json_without_field", "k.json", '[{"body": "a"}, {"body": "b"}]', "no 'text' field"),
    data_case("data_json_dict_of_lists", "m.json", '{"text": ["a", "b"]}', "is a JSON list; expected a string"),
    data_case("data_parquet_not_parquet", "p.parquet", "text,not parquet\n", "not a readable Parquet file"),
    data_case("data_parquet_without_column", "q.parquet", _parquet({"body": ["a", "b"]}), "no column 'text'"),
    data_case("data_binary_after_64kb", "tail.txt", b"x = 1\n" * 12_000 + b"\x00\x01\x02",
              "holds binary data (a NUL byte at offset 72,000)"),
    data_case("data_not_utf8_after_64kb", "tail.jsonl", ('{"text": "def f(): pass"}\n' * 3000).encode()
              + "caf\xe9\n".encode("latin-1"), "not UTF-8 text (invalid byte at offset"),
    data_case("data_too_little_text", "short.txt", "def f():\n    pass\n", "at most",
              n=64, seq=64, field="data.calibration.num_samples"),
    data_case("evaluation_data_binary", "eval.txt", b"\x00" * 64, "binary file", role="evaluation"),
    Case("data_file_missing", MOE_CAL.replace("builtin: python-stdlib", "files: [{tmp}/nope.txt]"),
         "data.calibration.files[0]", "data file not found", names_file="nope.txt"),
    Case("data_file_is_directory", MOE + "data:\n  evaluation: {files: [{tmp}/dir.txt]}\n",
         "data.evaluation.files[0]", "not a regular file", lambda tmp, mp: (tmp / "dir.txt").mkdir(), "dir.txt"),
    Case("data_file_wrong_suffix", MOE + "data:\n  evaluation: {files: [{tmp}/a.csv]}\n",
         "data.evaluation.files[0]", "expected a file ending in"),
    Case("hub_dataset_not_cached", MOE + "data:\n  evaluation: {hub: no-such-org/no_such_dataset_xyz}\n",
         "data.evaluation.hub", "not in the local datasets cache"),
    Case("seq_len_beyond_max_positions", MOE_CAL.replace("seq_len: 32", "seq_len: 4096"),
         "data.calibration.seq_len", "max_position_embeddings 128"),
    Case("eval_seq_len_beyond_max_positions", MOE + "data:\n  evaluation: {builtin: python-stdlib, seq_len: 129}\n",
         "data.evaluation.seq_len", "max_position_embeddings 128"),
    Case("zoo_seq_len_beyond_max_positions", "model: {zoo: tiny}\ndata:\n  evaluation: {builtin: python-stdlib, "
         "seq_len: 100000}\n", "data.evaluation.seq_len", "max_position_embeddings 512"),
    Case("zoo_budget_below_floor", "model: {zoo: tiny}\nbudgets: {keep: [0.1]}\n" + GATES, "budgets.keep[0]",
         "below 0.125"),
    Case("zoo_unbuilt_budget_below_floor", "model: {zoo: small}\nbudgets: {keep: [0.05]}\n" + GATES,
         "budgets.keep[0]", "zoo recipe 'small'", _unbuilt_zoo),
    # ---- model directories
    model_case("safetensors_truncated", _truncate, "truncated safetensors file", names_file="model/model.safetensors"),
    model_case("safetensors_short", lambda p: (p / "model.safetensors").write_bytes(b"\x01\x02"), "not even the 8-byte"),
    model_case("safetensors_header_too_long", lambda p: _header(p, {}, length=2**40), "corrupt or truncated"),
    model_case("safetensors_header_not_json", lambda p: _header(p, b"\xff\xfe garbage"), "header is not JSON"),
    model_case("safetensors_header_not_object", lambda p: _header(p, [1, 2]), "not a JSON object"),
    model_case("safetensors_bad_offsets", lambda p: _header(
        p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}), "has offsets 0..8"),
    model_case("safetensors_data_missing", lambda p: _header(
        p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}), "the file has"),
    model_case("no_weights", lambda p: (p / "model.safetensors").unlink(), "has no weights"),
    model_case("shard_missing", lambda p: (p / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}})), "model-00002-of-00002"),
    model_case("index_not_json", lambda p: (p / "model.safetensors.index.json").write_text(NOT_JSON),
               "not a safetensors index"),
    model_case("config_is_a_list", lambda p: (p / "config.json").write_text("[1, 2, 3]"), "expected a JSON object",
               names_file="model/config.json"),
    model_case("config_not_json", lambda p: (p / "config.json").write_text(NOT_JSON), "cannot read",
               names_file="model/config.json"),
    model_case("config_missing", lambda p: (p / "config.json").unlink(), "no config.json"),
    model_case("config_top_k_above_experts", lambda p: _edit_json(p / "config.json", num_experts_per_tok=99),
               "num_experts_per_tok is 99, but the model has 8 routed experts", names_file="model/config.json"),
    model_case("generation_config_not_json", lambda p: (p / "generation_config.json").write_text(NOT_JSON),
               "not a generation config", names_file="model/generation_config.json"),
    model_case("generation_config_is_a_list", lambda p: (p / "generation_config.json").write_text("[]"),
               "expected a JSON object (a generation config)", names_file="model/generation_config.json"),
    model_case("expert_tensor_missing", lambda p: _drop_tensors(p, "model.layers.0.mlp.experts.3.up_proj.weight"),
               "lacks 1 expert tensor(s) (model.layers.0.mlp.experts.3.up_proj.weight)",
               names_file="model/model.safetensors"),
    model_case("expert_projection_missing_in_a_layer", lambda p: _drop_tensors(
        p, *[f"model.layers.1.mlp.experts.{e}.gate_proj.weight" for e in range(8)]),
        "lacks 8 expert tensor(s) (model.layers.1.mlp.experts.0.gate_proj.weight"),
    Case("model_is_dense", "model: {path: {dense}}\n", "model.path", "no MoE layers"),
    Case("model_path_is_file", "model: {path: {tmp}/m.bin}\n", "model.path", "not a directory",
         _write("m.bin", b"x")),
    Case("model_dir_missing", "model: {path: {tmp}/nowhere}\n", "model.path", "model directory not found"),
    Case("unknown_zoo", "model: {zoo: tinny}\n", "model.zoo", "did you mean 'tiny'"),
    Case("two_model_sources", "model: {zoo: tiny, path: /x}\n", "model", "exactly one model source"),
    Case("device_cuda_without_cuda", "model: {path: {moe}, device: cuda}\n", "model.device", "CUDA is not available",
         _no_cuda),
    Case("device_mps_without_mps", "model: {path: {moe}, device: mps}\n", "model.device", "MPS is not available",
         _no_mps),
    Case("device_index_beyond_count", "model: {path: {moe}, device: 'cuda:3'}\n", "model.device",
         "has 1 CUDA device(s)", _one_cuda_device),
    Case("device_unknown", "model: {path: {moe}, device: tpu}\n", "model.device", "expected 'cpu'"),
    # ---- the spec file itself
    Case("spec_10mb_one_line", "{model: {zoo: tiny}, seed: '" + "9" * 10_000_000 + "'}", None,
         "a spec is at most 1,000,000"),  # refused from its size: parsing it took 283 s and 2.7 GB
    Case("spec_long_line", "model: {zoo: tiny}\nbudgets: {keep: [0.5], metric: '" + "x" * 50_000 + "'}\n",
         "budgets.metric", "expected one of 'params', 'flops'"),
    Case("spec_not_utf8", "model: {zoo: caf\udce9}\n", None, "cannot read spec file"),
    Case("spec_random_bytes", bytes(range(128, 256)).decode("latin-1"), None, "not UTF-8 YAML text"),
    Case("spec_binary_garbage", "".join(map(chr, range(128))) * 8, None, "not UTF-8 YAML text"),  # valid UTF-8
    Case("spec_binary_after_text", MOE + "seed: 1\x00\x01\x02\x03\n", None, "control character #x0000"),
    Case("spec_anchor_bomb", anchor_bomb(), None, "aliases expand too far"),  # 10^9 values from ~1 KB
    Case("spec_recursive_alias", MOE + "seed: &s [1, *s]\n", None, "refers to the collection that contains it"),
    Case("spec_nested_too_deep", MOE + "seed: " + "[" * 5000 + "]" * 5000 + "\n", None, "nested more than 200 deep"),
    Case("spec_yaml_syntax", "model: {zoo: tiny\n", None, "YAML syntax error"),
    Case("spec_empty", "# nothing\n", None, "the spec is empty"),
    Case("spec_top_level_list", "- model\n", None, "expected a mapping"),
    Case("spec_duplicate_key", MOE + "seed: 1\nseed: 2\n", "seed", "duplicate key 'seed'"),
    Case("spec_unknown_key", MOE + "budget: {keep: [0.5]}\n", "budget", "did you mean 'budgets'"),
]


# --------------------------------------------------------------------------- every option, every wrong kind
# Each option of each built-in pass and each spec section, given a value of the wrong kind:
# true where a number goes, a quoted number, a number past its bound, a choice not offered,
# a misspelt key. Generated from the options models, so a new option is covered when it lands.


def _literal_choices(annotation) -> list[str]:
    from typing import Literal

    if get_origin(annotation) is Literal:
        return [a for a in get_args(annotation) if isinstance(a, str)]
    return [c for a in get_args(annotation) for c in _literal_choices(a)]


def _takes_bool_only(annotation) -> bool:
    return annotation is bool or (bool in get_args(annotation) and all(a in (bool, type(None)) for a in get_args(annotation)))


def _wrong_values(annotation, metadata) -> list[tuple[str, str, str, str]]:
    """(id suffix, YAML value, a piece of the message, where in the value) for one option's type and bounds."""
    import annotated_types as at

    from flexc.passes.base import _numeric

    out = []
    if _takes_bool_only(annotation):
        out.append(("number_for_bool", "2", "expected true or false; found 2"))
    elif _numeric(annotation):
        out += [("bool", "true", "found true"), ("quoted_number", "'7'", "found the string '7' (remove the quotes)")]
        for m in metadata:
            if isinstance(m, at.Ge):
                out.append(("below_min", str(m.ge - 1), f"greater than or equal to {m.ge}"))
            elif isinstance(m, at.Gt):
                out.append(("at_min", str(m.gt), f"greater than {m.gt}"))
            elif isinstance(m, at.Le):
                out.append(("above_max", str(m.le + 1), f"less than or equal to {m.le}"))
            elif isinstance(m, at.Lt):
                out.append(("at_max", str(m.lt), f"less than {m.lt}"))
    choices = _literal_choices(annotation)
    if choices and not _numeric(annotation):
        value, at = ("[no_such_choice]", "[0]") if get_origin(annotation) is list else ("no_such_choice", "")
        out.append(("not_a_choice", value, f"expected one of {', '.join(map(repr, choices))}", at))
    return [o if len(o) == 4 else (*o, "") for o in out]


def _flow(path: tuple[str, ...], value: str) -> str:
    text = f"{path[-1]}: {value}"
    for key in reversed(path[:-1]):
        text = f"{key}: {{{text}}}"
    return text + "\n"


def _generated_cases() -> list[Case]:
    from pydantic import BaseModel

    from flexc.compiler.spec import DataSource, Spec
    from flexc.passes.registry import available_passes, resolve_pass

    cases = []

    def option_cases(name: str, model: type[BaseModel], path: tuple[str, ...]) -> None:
        for key, f in model.model_fields.items():
            where = (*path, f.alias or key)
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                option_cases(name, f.annotation, where)  # an option group (anneal's schedule, selection)
                continue
            for tag, value, says, at in _wrong_values(f.annotation, f.metadata):
                cases.append(Case(f"option_{name}_{'_'.join(where)}_{tag}", "model: {zoo: tiny}\npipeline: "
                                  f"[{{{name}: {{{_flow(where, value).strip()}}}}}]\n",
                                  f"pipeline[0].{name}.{'.'.join(where)}{at}", says))

    for name in available_passes():
        options = resolve_pass(name).Options.model_fields
        option_cases(name, resolve_pass(name).Options, ())
        misspelt = (next(iter(options)) + "z") if options else "granule"
        cases.append(Case(f"option_{name}_unknown_key", f"model: {{zoo: tiny}}\npipeline: [{{{name}: {{{misspelt}: 1}}}}]\n",
                          f"pipeline[0].{name}.{misspelt}", "unknown key"))

    def section(model: type[BaseModel], path: tuple[str, ...]) -> None:
        for key, f in model.model_fields.items():
            inner = f.annotation
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                section(inner, (*path, key))
                continue
            if key == "calibration" or key == "evaluation":
                section(DataSource, (*path, key))
                continue
            for tag, value, says, at in _wrong_values(inner, f.metadata):
                where = (*path, key)
                text = (f"model: {{zoo: tiny, {key}: {value}}}\n" if path == ("model",)
                        else "model: {zoo: tiny}\n" + _flow(where, value))
                cases.append(Case(f"spec_{'_'.join(where)}_{tag}", text, ".".join(where) + at, says))

    for key in ("model", "data", "export", "execution"):
        section(Spec.model_fields[key].annotation, (key,))
    from flexc.compiler.spec import BudgetSpec

    section(BudgetSpec, ("budgets",))
    for tag, value, says, _ in _wrong_values(Spec.model_fields["seed"].annotation, Spec.model_fields["seed"].metadata):
        if tag == "quoted_number":  # seed_bool, seed_negative, seed_overflows are written out above
            cases.append(Case(f"spec_seed_{tag}", f"model: {{zoo: tiny}}\nseed: {value}\n", "seed", says))
    return cases


CASES += _generated_cases()


# A message says what was expected, or what to do: one of these words or phrases.
GUIDANCE = re.compile(r"expected|expects|set |remove|did you mean|choose|use |add |give |write |re-save|save |"
                      r"move |delete|install|must be|is the right file|compresses MoE|less than|greater than", re.I)


def _spec_text(case: Case, tmp: Path) -> bytes:
    subst = {"{tmp}": str(tmp), "{model}": str(tmp / "model"), **{f"{{{k}}}": str(v) for k, v in _MODELS.items()}}
    text = case.spec
    for key, value in subst.items():
        text = text.replace(key, value)
    return text.encode("utf-8", errors="surrogateescape")


def test_there_are_at_least_250_kinds():
    assert len({c.id for c in CASES}) == len(CASES) >= 250


@pytest.mark.parametrize("command", ["validate", "compile"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, command, models, tmp_path, monkeypatch, capsys):
    _MODELS.update(models)
    monkeypatch.chdir(tmp_path)
    if case.setup is not None:
        case.setup(tmp_path, monkeypatch)
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(_spec_text(case, tmp_path))
    out = tmp_path / "out"
    argv = ["validate", str(spec)] if command == "validate" else ["compile", str(spec), "--out", str(out), "-q"]
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, err + captured.out
    assert "Traceback" not in err + captured.out
    assert f"{spec}:" in err or f"{spec}: " in err, err  # the file
    if case.field is not None:
        assert f": {case.field}: " in err, err  # the field
    assert case.says in err, err
    line = next(line for line in err.splitlines() if case.says in line)
    assert GUIDANCE.search(line), f"says what is wrong but not what was expected or what to do: {line}"
    if case.names_file is not None:
        assert str(tmp_path / case.names_file) in err, err
    assert len(err) < 5000, "messages stay short"
    assert not out.exists() or not any(out.iterdir()), "nothing written that would block the corrected spec"


# --------------------------------------------------------------------------- and what must still pass

LONG_DOC = "x = 1\n" * 20_000  # a first record longer than the bytes the checks read


GOOD_DATA = {
    "plain.txt": "def f():\n    return 1\n" * 200,
    "bom.jsonl": "\ufeff" + '{"text": "def f(): pass"}\n' * 200,
    "long_first_line.jsonl": json.dumps({"text": LONG_DOC}) + "\n" + '{"text": "y"}\n',
    "array.json": json.dumps([{"text": "def f(): pass\n" * 20}] * 20),
    "pretty.json": json.dumps([{"text": "def f(): pass\n" * 20, "id": i} for i in range(20)], indent=2),
    "one_object.json": json.dumps({"text": LONG_DOC}, indent=2),
    "nulls.jsonl": '{"text": null}\n' + '{"text": "def f(): pass"}\n' * 200,
    "cut_multibyte.txt": "a" + "é" * 40_000,  # the read ends inside a two-byte character
    "columns.parquet": _parquet({"text": ["def f(): pass\n" * 100] * 20, "id": list(range(20))}),
}


@pytest.mark.parametrize("name", sorted(GOOD_DATA))
def test_good_data_files_validate(name, models, tmp_path, capsys):
    content = GOOD_DATA[name]
    path = tmp_path / name
    if callable(content):
        content(path)
    else:
        path.write_text(content, encoding="utf-8")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"model: {{path: {models['moe']}}}\ndata:\n  calibration: {{files: [{path}], num_samples: 2, "
                    "seq_len: 32}\nbudgets: {keep: [0.75, 0.5]}\npipeline: [rank_channels, insert_action_gates, "
                    "anneal, fold_masks]\nexport: {formats: [nested, sliced]}\n")
    assert main(["validate", str(spec)]) == 0, capsys.readouterr().err


def test_a_budget_exactly_at_the_floor_and_a_whole_model_validate(models, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"model: {{path: {models['moe56']}}}\n{CAL}budgets: {{keep: [0.75, {16 / 56}]}}\n{GATES}"
                    "export: {formats: [nested, sliced, hf, graph]}\nseed: 9223372036854775807\n")
    assert main(["validate", str(spec)]) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------- the anchor bomb's cost


def test_the_anchor_bomb_is_refused_fast_and_small(tmp_path, capsys):
    import time
    import tracemalloc

    text = anchor_bomb()  # 10^9 values: building them took minutes and every byte of memory
    assert len(text) < 1200
    spec = tmp_path / "bomb.yaml"
    spec.write_text(text)
    warm = tmp_path / "warm.yaml"
    warm.write_text("model: {zoo: tinny}\n")
    main(["validate", str(warm)])  # the modules imported, as in a fresh `flexc validate` before parsing
    capsys.readouterr()
    start = time.perf_counter()
    code = main(["validate", str(spec)])
    elapsed = time.perf_counter() - start
    tracemalloc.start()
    try:
        main(["validate", str(spec)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert elapsed < 1.0, f"refused in {elapsed:.2f} s"
    assert peak < 100 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    first = err.splitlines()[1]  # the one problem: file, line, column and what to do
    assert first.startswith(f"{spec}:5:") and "aliases expand too far" in first and "write the values out" in first


def test_a_few_aliases_and_merge_keys_still_load():
    from flexc.compiler.yamlpos import MAX_ALIAS_NODES, YamlSyntaxError, load_with_positions

    data, _, _ = load_with_positions("base: &b {lr: 0.1, steps: [1, 2]}\nx:\n  <<: *b\n  lr: 0.2\ny: [*b, *b]\n")
    assert data["x"] == {"lr": 0.2, "steps": [1, 2]} and data["y"] == [data["base"]] * 2
    items = MAX_ALIAS_NODES // 2 - 1  # an aliased list of `items` values adds items + 1 nodes
    many = f"a: &a [{', '.join(['1'] * items)}]\nb: *a\n"
    assert len(load_with_positions(many)[0]["b"]) == items  # at the bound
    with pytest.raises(YamlSyntaxError, match="aliases expand too far") as info:
        load_with_positions(many + "c: *a\nd: *a\n")  # past it
    assert info.value.position.line == 4


# --------------------------------------------------------------------------- other commands' arguments


def _refused(argv, capsys, *says):
    code = main(argv)
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert code == 2, text
    assert "Traceback" not in text and "internal error" not in text, text
    for piece in says:
        assert piece in text, text
    return text


def _readonly_folder(tmp: Path) -> Path:
    """A folder no file can be created in, even by root."""
    if Path("/proc/self").is_dir():
        return Path("/proc")
    folder = tmp / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize("where", ["missing_folder", "folder_is_a_file", "target_is_a_folder", "readonly_folder"])
def test_inspect_graph_to_an_unwritable_path(where, models, tmp_path, capsys, monkeypatch):
    import flexc.models

    monkeypatch.setattr(flexc.models, "load_model", lambda *a, **k: pytest.fail("checked before the model loads"))
    (tmp_path / "file.txt").write_text("x")
    target, says = {
        "missing_folder": (tmp_path / "nowhere" / "g.svg", "does not exist"),
        "folder_is_a_file": (tmp_path / "file.txt" / "g.svg", "is not a directory"),
        "target_is_a_folder": (tmp_path, "is a directory; expected the path of an SVG file"),
        "readonly_folder": (_readonly_folder(tmp_path) / "g.svg", "is not writable"),
    }[where]
    _refused(["inspect", str(models["moe"]), "--graph", str(target)], capsys, f"--graph {target}", says)


def test_inspect_graph_expands_the_home_folder(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", str(models["moe"]), "--graph", "~/g.svg", "-q"]) == 0, capsys.readouterr().err
    assert (tmp_path / "g.svg").is_file() and not (tmp_path / "~").exists()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """A nested artifact and sliced checkpoints of a tiny random model (no compile, no training)."""
    from flexc.ir.testing import tiny_model
    from serving_artifacts import write_artifacts

    return write_artifacts(tiny_model("qwen3_moe"), None, tmp_path_factory.mktemp("artifacts"))


@pytest.mark.parametrize("port", ["70000", "0", "-1"])
def test_serve_port_out_of_range(port, artifacts, capsys):
    assert main(["serve", str(artifacts["nested"]), "--port", "8000", "--dry-run"]) == 0  # the artifact is servable
    capsys.readouterr()
    _refused(["serve", str(artifacts["nested"]), "--port", port, "--dry-run"], capsys, f"--port {port}",
             "between 1 and 65535")


def test_out_tilde_is_the_home_folder(models, tmp_path, capsys, monkeypatch):
    from flexc.compiler.driver import output_dir

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / "notes.txt").write_text("mine")  # a home folder is not a flexc run: refused, and kept
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert output_dir(None, None, "~/runs/x") == home / "runs" / "x"
    spec = cwd / "spec.yaml"
    spec.write_text(f"model: {{path: {models['moe']}}}\n")
    _refused(["compile", str(spec), "--out", "~", "-q"], capsys, str(home))
    assert not (cwd / "~").exists() and (home / "notes.txt").read_text() == "mine"
    assert list(cwd.iterdir()) == [spec]


# --------------------------------------------------------------------------- the Python API


@pytest.mark.parametrize("budget", ["0.5", None, True, [0.5]])
def test_set_budget_of_the_wrong_type(budget, artifacts):
    import flexc
    from flexc.compiler.errors import FlexcError

    model = flexc.load(artifacts["nested"])
    with pytest.raises(TypeError, match=r"set_budget\(budget\) (must be a number|needs a keep ratio)") as info:
        model.set_budget(budget)
    assert isinstance(info.value, FlexcError)
    if budget == "0.5":
        assert "found the string '0.5' (write 0.5 without quotes)" in str(info.value)
    with pytest.raises(TypeError, match=r"flexc.load\(budget\) must be a number"):
        flexc.load(artifacts["nested"], budget="0.4")
    model.set_budget(0.4)  # a number still works
    assert model.flexc.budget == 0.4


@pytest.mark.parametrize("budget", [0.33, 2.0, float("nan")])
def test_a_budget_the_artifact_lacks_is_a_flexc_error(budget, artifacts):
    import flexc
    from flexc.compiler.errors import FlexcError

    model = flexc.load(artifacts["nested"])
    with pytest.raises(FlexcError, match="no width table for budget .*; available budgets: 0.75, 0.4"):
        model.set_budget(budget)
    with pytest.raises(KeyError):  # a lookup that fails, as Python's convention has it
        model.set_budget(budget)


@pytest.mark.parametrize("kwargs,says", [
    ({"dtype": "float17"}, "flexc.load(dtype): expected a torch dtype or its name"),
    ({"device": "tpu"}, "flexc.load(device): expected a torch device such as 'cpu' or 'cuda:0'; found 'tpu'"),
], ids=["dtype", "device"])
def test_load_names_a_bad_dtype_or_device_before_loading(kwargs, says, artifacts):
    import flexc

    with pytest.raises(ValueError, match=re.escape(says)):
        flexc.load(artifacts["nested"], **kwargs)


def _truncate_weights(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _unknown_dtype(path: Path) -> None:
    """A header the checks pass (an unknown dtype has no size to check) but safetensors refuses."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "Z9"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    path.write_bytes(raw[:8] + text + raw[8 + n:]) if len(text) == n else pytest.skip("header grew")


@pytest.mark.parametrize("kind", ["nested", "sliced"])
@pytest.mark.parametrize("damage", [_truncate_weights, _unknown_dtype], ids=["truncated", "unknown_dtype"])
def test_load_of_damaged_weights_names_the_file(kind, damage, artifacts, tmp_path):
    import flexc
    from flexc.export.nested import ArtifactError

    source = artifacts["nested"] if kind == "nested" else next(v for k, v in artifacts.items() if k != "nested")
    copy = tmp_path / kind
    shutil.copytree(source, copy)
    weights = copy / "model.safetensors"
    damage(weights)
    with pytest.raises(ArtifactError) as info:
        flexc.load(copy)
    message = str(info.value)
    assert message.startswith(f"{weights}: ") and "re-export the artifact" in message, message
    assert "flexc_widths" not in message  # only the damaged file


def test_a_missing_weight_tensor_is_refused_at_load_and_leaves_nothing(models, tmp_path, capsys):
    """A non-expert tensor missing from the checkpoint: transformers would initialise it at random and carry
    on. Validate cannot map every family's checkpoint names to the model's without loading it; the load
    (the compile's first seconds) refuses it, before any stage, and the compile leaves no folder behind."""
    model = tmp_path / "model"
    shutil.copytree(models["moe"], model)
    _drop_tensors(model, "model.layers.1.self_attn.q_proj.weight")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"model: {{path: {model}}}\n" + CAL + "budgets: {keep: [0.5]}\npipeline: [rank_channels, uniform]\n")
    out = tmp_path / "out"
    code = main(["compile", str(spec), "--out", str(out), "-q"])
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert code == 2 and "Traceback" not in err, err
    assert f"{model}: its weight files lack 1 tensor(s) the model needs (model.layers.1.self_attn.q_proj.weight)" in err
    assert "LOAD REPORT" not in err  # transformers' own report is not printed beside flexc's message
    assert not out.exists()


@pytest.mark.parametrize("call,says", [
    (lambda flexc: flexc.compile(42), "expected a flexc.Spec, a mapping or the path of a YAML spec; found int"),
    (lambda flexc: flexc.load(None), "flexc.load(path): expected the path of a compiled artifact; found NoneType"),
], ids=["compile_of_a_number", "load_of_none"])
def test_the_python_api_names_the_argument_of_the_wrong_type(call, says):
    import flexc

    with pytest.raises(TypeError, match=re.escape(says)):
        call(flexc)
