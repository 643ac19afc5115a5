"""Loading checks what it reads: an edited, corrupt or mismatched artifact file is a clear
flexc error that names the file, never another budget's checkpoint or a raw library error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import flexc
from flexc.compiler.errors import FlexcError
from flexc.compiler.exporters import ExportContext, get_exporter
from flexc.export.nested import MANIFEST_FILE, ArtifactError, write_nested
from flexc.export.tables import WIDTHS_FILE, WidthTables, budget_key
from flexc.ir.groups import find_expert_groups
from flexc.ir.testing import tiny_model

BUDGETS = [0.7, 0.35]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A nested and a sliced export of one tiny model with two nested width tables (no training)."""
    root = tmp_path_factory.mktemp("artifacts")
    model = tiny_model("qwen3_moe")
    groups = find_expert_groups(model)
    full = [g.intermediate_size for g in groups]
    high = torch.tensor(full)[:, None].expand(len(groups), groups[0].num_experts).clone()
    high[:, ::2] //= 2
    tables = WidthTables(BUDGETS, torch.stack([high, high // 2]), "params", [g.layer for g in groups], full)
    write_nested(root / "nested", model, groups, tables)
    state = {"width_budgets": tables.budgets, "width_tables": tables.tables, "width_metric": "params"}
    (root / "sliced").mkdir()
    get_exporter("sliced")(ExportContext(target=root / "sliced", spec=None, model=model, state=state))
    return root


@pytest.fixture
def out(artifacts, tmp_path):
    """A fresh copy of both artifacts that a test may damage."""
    shutil.copytree(artifacts, tmp_path / "out")
    return tmp_path / "out"


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_intact_artifacts_load_the_budget_asked_for(out):
    model = flexc.load(out / "sliced", budget=0.35)
    assert model.config.flexc_sliced["budget"] == 0.35
    assert flexc.load(out, budget=0.35).flexc.budget == 0.35  # a compile's output directory: nested first


def test_edited_top_manifest_cannot_swap_budgets(out):
    # keep 0.35 pointed at keep 0.70's folder: before, this returned the keep-0.7 checkpoint.
    edit_json(out / "sliced" / MANIFEST_FILE, lambda m: m["budgets"][1].update(dir=budget_key(0.7)))
    with pytest.raises(ArtifactError) as info:
        flexc.load(out / "sliced", budget=0.35)
    message = str(info.value)
    assert str(out / "sliced" / MANIFEST_FILE) in message and "keep 0.35" in message and "keep 0.7" in message


def test_budget_folder_manifest_and_config_must_agree(out):
    folder = out / "sliced" / budget_key(0.35)
    edit_json(folder / "config.json", lambda c: c["flexc_sliced"].update(budget=0.7))
    with pytest.raises(ArtifactError, match=f"{folder / 'config.json'}.*keep 0.7"):
        flexc.load(folder)
    with pytest.raises(ArtifactError, match="config.json"):
        flexc.load(out / "sliced", budget=0.35)


def test_manifest_cannot_point_outside_the_export(out):
    edit_json(out / "sliced" / MANIFEST_FILE, lambda m: m["budgets"][1].update(dir="../nested"))
    with pytest.raises(ArtifactError, match=r"'budgets' must be a list of \{keep: number, dir: folder name\}"):
        flexc.load(out / "sliced", budget=0.35)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_width_tables_name_the_file(out, damage):
    path = out / "nested" / WIDTHS_FILE
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x00not safetensors" * 8, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(ArtifactError, match=f"{path}: not a readable flexc width table"):
        flexc.load(out / "nested", budget=0.35)


def test_width_tables_must_match_the_manifest(out):
    path = out / "nested" / WIDTHS_FILE
    tables = WidthTables.load(path)
    WidthTables([0.9, 0.35], tables.tables, tables.metric, tables.layers, tables.full).save(path)
    with pytest.raises(ArtifactError, match=r"lists budgets \[0.7, 0.35\] but .* holds \[0.9, 0.35\]"):
        flexc.load(out / "nested")
    path.unlink()
    with pytest.raises(ArtifactError, match=f"{path} is missing"):
        flexc.load(out / "nested")


@pytest.mark.parametrize("where", ["nested", "sliced", f"sliced/{budget_key(0.35)}"])
@pytest.mark.parametrize("text, expected", [("{\"kind\": \"nest", "is not valid JSON"),
                                            ("[1, 2]", "must be a JSON object; found a list"),
                                            ("\"nested\"", "must be a JSON object; found a str")])
def test_corrupt_or_non_object_manifest_names_the_file(out, where, text, expected):
    path = out / where / MANIFEST_FILE
    path.write_text(text)
    with pytest.raises(ArtifactError, match=f"{path}: the flexc manifest {expected}"):
        flexc.load(out / "sliced", budget=0.35) if where != "nested" else flexc.load(out / "nested")


def test_unknown_kind_and_not_an_artifact(out, tmp_path):
    edit_json(out / "nested" / MANIFEST_FILE, lambda m: m.update(kind="zipped"))
    with pytest.raises(ArtifactError, match=f"{out / 'nested' / MANIFEST_FILE}: unknown flexc artifact kind"):
        flexc.load(out / "nested")
    with pytest.raises(FileNotFoundError, match="not a flexc artifact") as info:
        flexc.load(tmp_path / "empty")
    assert isinstance(info.value, FlexcError)  # a user error for the CLI (exit 2)


def test_load_errors_are_cli_user_errors():
    # The CLI prints these as one message without a traceback and exits 2.
    from flexc.cli import _user_error_types
    from flexc.export.tables import BudgetError

    assert issubclass(ArtifactError, _user_error_types()) and issubclass(BudgetError, _user_error_types())
