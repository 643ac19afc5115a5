"""The spec: round-trip, normalisation, and one clear located message per kind of mistake."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import flexc
from flexc.cli import main
from flexc.compiler.errors import SpecError
from flexc.compiler.spec import BudgetSpec, Spec, parse_spec

HERE = Path(__file__).parent
BROKEN = HERE / "broken_specs"
ROOT = HERE.parent
sys.path.insert(0, str(BROKEN))
import compiler_helpers as helpers  # noqa: E402

BROKEN_SPECS = sorted(BROKEN.glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (\d+):(\d*): (.*)$")


def expectations(path: Path) -> list[tuple[int, int | None, str]]:
    out = []
    for line in path.read_text().splitlines():
        m = EXPECT.match(line)
        if m:
            out.append((int(m[1]), int(m[2]) if m[2] else None, m[3]))
    return out


@pytest.fixture
def toy_passes(monkeypatch):
    helpers.register_toy_passes(monkeypatch)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return helpers.make_dense(tmp_path_factory.mktemp("dense") / "dense-model")


# --------------------------------------------------------------------------- round trip


FULL = """
model:
  hub: Qwen/Qwen1.5-MoE-A2.7B
  revision: main
  dtype: bfloat16
  device: auto
data:
  calibration: {builtin: python-stdlib, num_samples: 16, seq_len: 64, batch_size: 4}
  evaluation: {hub: wikitext, config: wikitext-2-raw-v1, split: test, text_field: text}
budgets:
  prune: [0.2, 0.4, 0.6]
  metric: flops
pipeline:
  - toy_rank: {score: activation}
  - toy_gate
  - name: toy_rank
    options: {granule: 32}
export: {dir: out/x, formats: []}
seed: 7
"""


def test_round_trip(toy_passes):
    spec = Spec.from_yaml_text(FULL)
    again = Spec.from_yaml_text(spec.to_yaml())
    assert again == spec
    assert again.to_yaml() == spec.to_yaml()
    assert [e.name for e in spec.pipeline] == ["toy_rank", "toy_gate", "toy_rank"]
    assert spec.pipeline[2].options == {"granule": 32}
    assert spec.budgets.keep_ratios == (0.8, 0.6, 0.4)
    assert spec.model.source == ("hub", "Qwen/Qwen1.5-MoE-A2.7B")


def test_python_api_builds_the_same_spec(toy_passes):
    spec = flexc.Spec(
        model={"zoo": "tiny"},
        budgets={"keep": [0.75, 0.5]},
        pipeline=[{"toy_rank": {"score": "taylor"}}, "toy_gate"],
    )
    assert Spec.from_yaml_text(spec.to_yaml()) == spec
    assert spec.fingerprint() == Spec.from_yaml_text(spec.to_yaml()).fingerprint()


def test_fingerprint_ignores_export_dir_only():
    a = Spec.model_validate({"model": {"zoo": "tiny"}, "export": {"dir": "a"}})
    b = Spec.model_validate({"model": {"zoo": "tiny"}, "export": {"dir": "b"}})
    c = Spec.model_validate({"model": {"zoo": "tiny"}, "seed": 1})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_budgets_normalised_high_to_low():
    assert BudgetSpec(keep=[1.0, 0.5, 0.25]).keep_ratios == (1.0, 0.5, 0.25)
    assert BudgetSpec(prune=[0.0, 0.3, 0.7]).keep_ratios == (1.0, 0.7, 0.3)
    assert BudgetSpec(keep=0.5).keep == [0.5]


def test_quickstart_spec_is_valid():
    spec = flexc.validate(ROOT / "specs" / "quickstart.yaml")
    assert spec.model.source == ("zoo", "tiny")
    assert spec.data.calibration.builtin == "python-stdlib"
    assert spec.budgets.keep_ratios == tuple(sorted(spec.budgets.keep_ratios, reverse=True))


def test_pass_options_are_validated_once_per_compile(monkeypatch):
    """Reading and checking a spec validates each entry's options once; the passes reuse them."""
    from flexc.compiler import driver
    from flexc.passes.base import PassOptions

    validated = []
    original = PassOptions.model_validate.__func__

    def counting(cls, *args, **kwargs):
        validated.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PassOptions, "model_validate", classmethod(counting))
    spec, _ = driver.prepare_spec(ROOT / "specs" / "quickstart.yaml")
    first, second = spec.pipeline[2].build(), spec.pipeline[2].build()
    assert sorted(validated) == sorted(type(e.pass_options).__name__ for e in spec.pipeline)
    assert first.options == second.options == spec.pipeline[2].pass_options
    assert first.options is not second.options  # one pass cannot change another's options


def test_zoo_model_calibrates_on_its_corpus_by_default():
    # The README's Python example: a zoo model, a pass that reads calibration data, no data section.
    spec = flexc.Spec(model={"zoo": "tiny"}, budgets={"keep": [0.75, 0.5]},
                      pipeline=[{"rank_channels": {"score": "taylor"}}])
    assert spec.data.calibration.builtin == "python-stdlib"
    assert Spec.from_yaml_text(spec.to_yaml()) == spec  # the default is written out, so it round-trips
    # Nothing is added where no pass reads data, nor over a calibration source the spec gives.
    assert flexc.Spec(model={"zoo": "tiny"}, pipeline=["lower_kernels"]).data.calibration is None
    given = flexc.Spec(model={"zoo": "tiny"}, data={"calibration": {"builtin": "python-stdlib", "num_samples": 3}},
                       pipeline=["rank_channels"])
    assert given.data.calibration.num_samples == 3
    # A path model has no known corpus: the spec stays as written and validation refuses it.
    assert flexc.Spec(model={"path": "m"}, pipeline=["rank_channels"]).data.calibration is None


def test_long_source_lines_are_cut_around_the_column():
    from flexc.compiler.errors import source_excerpt

    line = "a" * 5000 + "X" + "b" * 5000
    excerpt, column = source_excerpt(line, 5001)
    assert len(excerpt) <= 126 and excerpt[column - 1] == "X"
    assert excerpt.startswith("...") and excerpt.endswith("...")
    assert source_excerpt("short", 3) == ("short", 3)


def test_schema_is_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == {"model", "data", "budgets", "pipeline", "export", "execution", "seed"}
    assert schema["required"] == ["model"]
    assert schema["$defs"]["ModelSpec"]["additionalProperties"] is False


# --------------------------------------------------------------------------- broken specs


def test_there_are_enough_broken_specs():
    assert len(BROKEN_SPECS) >= 12
    for path in BROKEN_SPECS:
        assert expectations(path), f"{path.name} has no '# expect:' line"


@pytest.mark.parametrize("path", BROKEN_SPECS, ids=lambda p: p.stem)
def test_broken_spec_message(path, toy_passes, dense_dir, tmp_path, monkeypatch, capsys):
    """`flexc validate` prints file:line:col, the field and the message for each mistake; exit 2."""
    monkeypatch.chdir(tmp_path)
    if "# needs: dense-model" in path.read_text():
        (tmp_path / "dense-model").symlink_to(dense_dir)
    (tmp_path / "present.txt").write_text("some text")
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for line, col, message in expectations(path):
        where = f"{path}:{line}:{col}: " if col is not None else f"{path}:{line}:"
        hits = [ln for ln in err.splitlines() if ln.startswith(where)]
        assert hits, f"no message at {where}\n{err}"
        assert any(message in h for h in hits), f"expected {message!r} at {where}\n{err}"
    # one message per problem: as many located lines as expectations
    located = [ln for ln in err.splitlines() if ln.startswith(f"{path}:") and re.match(r".*:\d+:\d+: ", ln)]
    assert len(located) == len(expectations(path)), err


def test_broken_spec_error_object_has_positions(toy_passes):
    text = (BROKEN / "budget_duplicate.yaml").read_text()
    with pytest.raises(SpecError) as info:
        parse_spec(text, "x.yaml")
    (issue,) = info.value.issues
    assert issue.field == "budgets.keep[2]"
    assert (issue.position.line, issue.position.column) == (5, 20)
    # the report quotes the line and points at the column
    report = str(info.value)
    assert "    5 |   keep: [0.8, 0.5, 0.5]" in report
    assert report.splitlines()[-1].endswith(" " * 19 + "^")


def test_format_without_an_exporter_is_refused_with_its_position(monkeypatch):
    """Every built-in format has an exporter; one that fails to load (a broken plugin or a
    missing module) must still be refused at validation, not halfway through a compile."""
    import flexc.compiler.exporters as exporters

    exporters.available_exports()  # load the registry, then lose one exporter
    monkeypatch.delitem(exporters._EXPORTERS, "hf")
    with pytest.raises(SpecError) as info:
        parse_spec("model: {zoo: tiny}\nexport: {formats: [nested, hf]}\n", "x.yaml")
    (issue,) = info.value.issues
    assert issue.field == "export.formats[1]"
    assert "export format 'hf' is not available in this version of flexc" in issue.message


def test_empty_and_non_mapping_specs(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    assert main(["validate", str(empty)]) == 2
    assert "the spec is empty" in capsys.readouterr().err
    listy = tmp_path / "list.yaml"
    listy.write_text("- model\n- zoo\n")
    assert main(["validate", str(listy)]) == 2
    assert f"{listy}:1:1: (top level): expected a mapping" in capsys.readouterr().err


def test_missing_spec_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "spec file not found" in capsys.readouterr().err


def test_data_and_model_source_rules():
    with pytest.raises(Exception, match="exactly one data source"):
        Spec.model_validate({"model": {"zoo": "tiny"}, "data": {"calibration": {"num_samples": 3}}})
    with pytest.raises(Exception, match="'revision' only applies"):
        Spec.model_validate({"model": {"zoo": "tiny", "revision": "main"}})
    with pytest.raises(Exception, match="splits 'train', 'heldout'"):
        Spec.model_validate({"model": {"zoo": "tiny"}, "data": {"calibration": {"builtin": "python-stdlib", "split": "test"}}})
    with pytest.raises(Exception, match=r"expected a file ending in"):
        Spec.model_validate({"model": {"zoo": "tiny"}, "data": {"calibration": {"files": ["a.csv"]}}})


def test_docs_describe_every_field():
    """docs/spec.md documents every field of every spec model."""
    from flexc.compiler.spec import (BudgetSpec, DataSource, DataSpec, ExecutionSpec, ExportSpec, ModelSpec,
                                     PassEntry)

    doc = (ROOT / "docs" / "spec.md").read_text()
    for model in (Spec, ModelSpec, DataSpec, DataSource, BudgetSpec, PassEntry, ExportSpec, ExecutionSpec):
        for name in model.model_fields:
            assert f"`{name}`" in doc, f"docs/spec.md does not document {model.__name__}.{name}"
