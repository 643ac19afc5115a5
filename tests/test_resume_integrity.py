"""A run directory whose files were edited, truncated or deleted never resumes into different artifacts.

One compile (rank, uniform widths, a nested export) of the tiny random MoE is copied per test and
damaged. Damage a digest can see is refused by the manifest's digests (:mod:`flexc.compiler.integrity`);
damage made to look recorded (the manifest's digests updated too: ``helpers.rehash``) is refused by
the loaders' own checks of meaning (permutations, shapes, nested widths). Either way the compile
exits 2, names the file, and says how to go on (``--force`` or another ``--out``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flexc.cli import main

sys.path.insert(0, str(Path(__file__).parent / "broken_specs"))
import compiler_helpers as helpers  # noqa: E402

SPEC = """model: {{path: {model}}}
data:
  calibration: {{builtin: python-stdlib, num_samples: 4, seq_len: 32, batch_size: 2}}
budgets: {{keep: [0.75, 0.5]}}
pipeline: [{{rank_channels: {{plot: false}}}}, uniform]
export: {{formats: [nested]}}
"""


@pytest.fixture(scope="module")
def compiled(moe_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("integrity")
    spec = root / "spec.yaml"
    spec.write_text(SPEC.format(model=moe_dir))
    assert main(["compile", str(spec), "--out", str(root / "run"), "-q"]) == 0
    return spec, root / "run"


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _write_manifest(run: Path, manifest: dict) -> None:
    (run / "manifest.json").write_text(json.dumps(manifest))


def interrupted(run: Path) -> None:
    """As if killed during the export: the passes resume from state/, the export runs again."""
    manifest = _manifest(run)
    manifest["status"] = "interrupted"
    for record in manifest["stages"]:
        if record["name"] == "export:nested":
            record.update(status="interrupted")
            record.pop("files", None)
    _write_manifest(run, manifest)
    shutil.rmtree(run / "nested")


def flip_last_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


def edit_tensors(path: Path, **changes) -> None:
    """Replace tensors of a safetensors file (``name=fn(old)``), keeping its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    for name, fn in changes.items():
        key = next(k for k in tensors if k == name or k.endswith(name))
        tensors[key] = fn(tensors[key]).contiguous()
    save_file(tensors, str(path), metadata=meta)


def _not_a_permutation(perm: torch.Tensor) -> torch.Tensor:
    perm = perm.clone()
    perm[0, 1] = perm[0, 0]
    return perm


def _grown(widths: torch.Tensor) -> torch.Tensor:
    widths = widths.clone()
    widths[0, 0, 0] = widths[1, 0, 0] - 1  # keep 0.5 wider than keep 0.75 for one expert
    return widths


def _unrecorded_stage(run: Path) -> None:
    manifest = _manifest(run)
    del manifest["state_before"]  # the manifest vouches for 02-uniform's state alone
    _write_manifest(run, manifest)
    _set(run, "state/stage.json", '{"stage": "01-rank_channels"}')


def _set(run: Path, rel: str, text: str) -> None:
    (run / rel).write_text(text)


# (id, damage(run), resume from an interrupted run?, the file named, a piece of the message)
DIGEST_CASES = [
    ("stage_table_edited", lambda r: _set(r, "stages/02-uniform/width_tables.json", "{}"), True,
     "stages/02-uniform/width_tables.json", "changed since stage 02-uniform wrote it"),
    ("stage_scores_deleted", lambda r: (r / "stages/01-rank_channels/channel_scores.safetensors").unlink(), True,
     "stages/01-rank_channels/channel_scores.safetensors", "written by stage 01-rank_channels, now missing"),
    ("state_edited", lambda r: flip_last_byte(r / "state/compile_state.safetensors"), True,
     "state/compile_state.safetensors", "changed since stage 02-uniform wrote it"),
    ("state_truncated", lambda r: (r / "state/graph/graph_weights.safetensors").write_bytes(
        (r / "state/graph/graph_weights.safetensors").read_bytes()[:100]), True,
     "state/graph/graph_weights.safetensors", "changed since stage 02-uniform wrote it"),
    ("state_of_another_stage", lambda r: _set(r, "state/stage.json", '{"stage": "01-rank_channels"}'), True,
     "state/", "changed since stage 01-rank_channels wrote it"),  # the state 01 saved is not what state/ holds
    ("exports_missing_in_a_complete_run", lambda r: shutil.rmtree(r / "nested"), False,
     "nested/", "written by stage export:nested, now missing"),
    ("export_edited_in_a_complete_run", lambda r: flip_last_byte(r / "nested/model.safetensors"), False,
     "nested/model.safetensors", "changed since stage export:nested wrote it"),
    ("export_config_edited_in_a_complete_run", lambda r: _set(r, "nested/config.json", "{}"), False,
     "nested/config.json", "changed since stage export:nested wrote it"),
]

# Damage with the manifest's digests updated to match: the loaders' checks of meaning refuse it.
MEANING_CASES = [
    ("permutation_not_a_permutation", lambda r: edit_tensors(
        r / "state/graph/graph_weights.safetensors", **{"channel_perm::0": _not_a_permutation}),
     "state/graph/graph_weights.safetensors", "expert 0's channel order is not a permutation of 0..31"),
    ("permutation_of_another_shape", lambda r: edit_tensors(
        r / "state/graph/graph_weights.safetensors", **{"channel_perm::0": lambda p: p[:, :16]}),
     "state/graph/graph_weights.safetensors", "expected a [8, 32] channel permutation per expert; found (8, 16)"),
    ("routing_counts_of_another_shape", lambda r: edit_tensors(
        r / "state/compile_state.safetensors", routing_counts=lambda t: t[:, :3]),
     "state/compile_state.safetensors", "routing_counts is [2, 3]; expected [2, 8] (layers, experts)"),
    ("routing_counts_negative", lambda r: edit_tensors(
        r / "state/compile_state.safetensors", routing_counts=lambda t: -t),
     "state/compile_state.safetensors", "routing_counts holds negative or non-finite values"),
    ("channel_scores_of_another_shape", lambda r: edit_tensors(
        r / "state/compile_state.safetensors", channel_scores=lambda t: t[..., :8]),
     "state/compile_state.safetensors", "channel_scores is [2, 8, 8]; expected [2, 8, 32]"),
    ("width_tables_not_nested", lambda r: edit_tensors(r / "state/flexc_widths.safetensors", widths=_grown),
     "state/flexc_widths.safetensors", "width tables are not nested"),
    ("widths_beyond_the_experts", lambda r: edit_tensors(
        r / "state/graph/graph_weights.safetensors", **{"flexc_widths": lambda w: w + 100}),
     "state/graph/graph_weights.safetensors", "widths must be 8 values in [0, 32]"),
    ("state_of_an_unrecorded_stage", _unrecorded_stage, "state", "holds the state of stage 01-rank_channels, which"),
]


def _resume(spec: Path, run: Path, capsys) -> str:
    code = main(["compile", str(spec), "--out", str(run), "-q"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 2, text
    assert "Traceback" not in text
    assert "--force" in text and "--out" in text, text
    return text


@pytest.mark.parametrize("case", DIGEST_CASES, ids=[c[0] for c in DIGEST_CASES])
def test_damage_the_digests_see_is_refused(case, compiled, tmp_path, capsys):
    _, damage, resume, file, says = case
    spec, source = compiled
    run = tmp_path / "run"
    shutil.copytree(source, run)
    if resume:
        interrupted(run)
    damage(run)
    text = _resume(spec, run, capsys)
    assert f"{run}/{file}" in text and says in text, text


@pytest.mark.parametrize("case", MEANING_CASES, ids=[c[0] for c in MEANING_CASES])
def test_damage_made_to_look_recorded_is_refused_by_meaning(case, compiled, tmp_path, capsys):
    _, damage, file, says = case
    spec, source = compiled
    run = tmp_path / "run"
    shutil.copytree(source, run)
    interrupted(run)
    damage(run)
    helpers.rehash(run)
    text = _resume(spec, run, capsys)
    assert f"{run}/{file}" in text and says in text, text


def test_a_done_stage_without_recorded_files_is_refused(compiled, tmp_path, capsys):
    spec, source = compiled
    run = tmp_path / "run"
    shutil.copytree(source, run)
    manifest = _manifest(run)
    del manifest["stages"][2]["files"]  # 01-rank_channels: claimed done, vouched for by nothing
    _write_manifest(run, manifest)
    text = _resume(spec, run, capsys)
    assert "stage 01-rank_channels is recorded as done but lists no files" in text


def test_an_undamaged_run_resumes_to_the_same_artifacts(compiled, tmp_path, capsys):
    spec, source = compiled
    run = tmp_path / "run"
    shutil.copytree(source, run)
    interrupted(run)
    assert main(["compile", str(spec), "--out", str(run), "-q"]) == 0
    for name in ("model.safetensors", "flexc_widths.safetensors"):  # header order varies: compare the tensors
        again, before = load_file(str(run / "nested" / name)), load_file(str(source / "nested" / name))
        assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in before), name
    assert (run / "nested/config.json").read_text() == (source / "nested/config.json").read_text()
    capsys.readouterr()
    assert main(["compile", str(spec), "--out", str(run)]) == 0  # up to date, verified
    captured = capsys.readouterr()
    assert f"{run}  (up to date)" in captured.out
