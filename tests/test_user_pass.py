"""The "Writing a pass" example runs from a YAML spec by module:Class; ordering is checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flexc
from flexc.compiler.errors import SpecError
from flexc.ir.state import CompileState

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"



def write_spec(path: Path, moe_dir: Path, out: Path, pipeline: str) -> Path:
    path.write_text(f"""\
model: {{path: {moe_dir}}}
data:
  calibration: {{builtin: python-stdlib, num_samples: 4, seq_len: 32, batch_size: 2}}
budgets: {{keep: [0.5]}}
pipeline:
{pipeline}
export: {{dir: {out}}}
""")
    return path


def test_example_pass_runs_from_yaml(moe_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.yaml", moe_dir, out, """\
  - rank_channels: {score: activation, plot: false}
  - name: cold_experts:DropColdExperts
    options: {min_share: 0.2}
""")
    result = flexc.compile(spec, quiet=True)
    stage = [name for name in result.ran if name.startswith("02-")]
    assert stage == ["02-cold_experts.DropColdExperts"]
    report = json.loads((out / "stages" / stage[0] / "cold_experts.json").read_text())
    counts = load_file(str(out / "stages" / "01-rank_channels" / "routing_stats.safetensors"))["counts"]
    share = counts / counts.sum(dim=1, keepdim=True)
    expected = {f"layer {i}": (share[i] < 0.2).nonzero().flatten().tolist() for i in range(share.shape[0])}
    assert report == expected
    assert any(report.values())  # with a 20% floor, some expert is cold
    cold = CompileState.load(out / "state").extras["cold_experts"]  # handed on in extras, saved for a resume
    assert {f"layer {i}": cold[i].nonzero().flatten().tolist() for i in range(cold.shape[0])} == report


def test_example_pass_before_its_requirement_is_a_spec_error(moe_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = write_spec(tmp_path / "spec.yaml", moe_dir, tmp_path / "run", """\
  - name: cold_experts:DropColdExperts
  - rank_channels: {score: activation}
""")
    with pytest.raises((SpecError, flexc.FlexcError), match="'routing_stats' is provided by 'rank_channels', "
                                                             "which runs later"):
        flexc.compile(spec, quiet=True)


def test_example_pass_option_typo_is_a_spec_error(moe_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = write_spec(tmp_path / "spec.yaml", moe_dir, tmp_path / "run", """\
  - rank_channels: {score: activation}
  - name: cold_experts:DropColdExperts
    options: {min_shares: 0.2}
""")
    with pytest.raises(SpecError) as err:
        flexc.validate(spec)
    assert "min_shares" in str(err.value) and "min_share" in str(err.value)


def test_unknown_pass_name_is_a_spec_error(moe_dir, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", moe_dir, tmp_path / "run", "  - rank_chanels: {}\n")
    with pytest.raises(SpecError, match="did you mean 'rank_channels'"):
        flexc.validate(spec)


def test_preserves_computation_is_enforced():
    from flexc.ir import lower
    from flexc.ir.testing import tiny_model
    from flexc.passes import Pass, PassContext, PassResult
    from flexc.passes.manager import run_checked

    class Liar(Pass):
        name = "liar"
        preserves_computation = True

        def run(self, graph, ctx):
            with torch.no_grad():
                graph.expert_weights(graph.groups[0])[1].mul_(2)
            return PassResult(graph=graph)

    graph = lower(tiny_model("mixtral"))
    with pytest.raises(AssertionError, match="claims preserves_computation"):
        run_checked(Liar(), graph, PassContext(workdir=Path(".")), {"input_ids": torch.randint(0, 97, (2, 7))})


USER_CHECKS = '''
from flexc.passes.base import Pass, PassOptions
from flexc.passes.registry import register_pass


class Options(PassOptions):
    floor: float = 0.6


@register_pass
class Picky(Pass):
    """Declares everything the compiler asks of a pass, with no entry for it in the compiler."""

    name = "picky_user_pass"
    Options = Options
    packages = ("flexc_no_such_package",)
    prunes_whole_experts = True

    @classmethod
    def check_spec(cls, options, site):
        return [(site.loc, f"picky: {site.shape.num_experts} experts on {site.device}")]

    @classmethod
    def keep_floor(cls, options, shape, metric):
        return options.floor, "picky keeps at least its floor"

    @classmethod
    def data_parallel_problem(cls, options):
        return "picky counts on one process"

    def run(self, graph, ctx):
        return graph
'''


def test_a_user_pass_declares_its_own_checks(moe_dir, tmp_path, monkeypatch):
    """What the compiler asks of a pass (packages, spec checks, keep floor, whole-expert pruning,
    data-parallel limits) comes from the pass itself: a user's pass gets each without a compiler edit."""
    from flexc.compiler.data_parallel import data_parallel_problems

    (tmp_path / "picky_pass.py").write_text(USER_CHECKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = write_spec(tmp_path / "spec.yaml", moe_dir, tmp_path / "run", """\
  - rank_channels: {score: activation}
  - name: picky_pass:Picky
""").read_text().replace("export: {", "export: {formats: [hf], ")
    (tmp_path / "spec.yaml").write_text(spec)
    with pytest.raises(SpecError) as err:
        flexc.validate(tmp_path / "spec.yaml")
    text = str(err.value)
    assert "needs flexc_no_such_package, not installed" in text
    assert "picky: 8 experts on cpu" in text  # moe_dir: 8 experts per layer, device cpu
    assert "keep 0.5 is below 0.6, the lowest keep reachable: picky keeps at least its floor" in text
    assert "the hf export cannot express whole-expert pruning (picky_user_pass" in text
    parsed = flexc.Spec.from_yaml_text(spec)
    assert data_parallel_problems(parsed) == ["pipeline step 2: picky counts on one process"]
