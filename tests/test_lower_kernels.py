"""lower_kernels: plans written; the reference path on CPU; Triton (interpreted) == reference."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from flexc.ir import lower
from flexc.ir.testing import tiny_model
from flexc.passes import PassContext, resolve_pass


def test_auto_on_cpu_keeps_reference_op_and_writes_plan(tmp_path):
    graph = lower(tiny_model("qwen3_moe"))
    nodes_before = [n.name for n in graph.expert_nodes()]
    result = resolve_pass("lower_kernels")({})(graph, PassContext(workdir=tmp_path, quiet=True))
    assert not result.changed_nodes and [n.name for n in graph.expert_nodes()] == nodes_before
    plan = json.loads((tmp_path / "kernel_plan.json").read_text())
    assert plan["backend"] == "reference" and set(plan["layers"]) == {"0", "1"}
    (key,) = plan["plans"]
    assert (tmp_path / "kernels" / key / "experts_kernels.py").stat().st_size > 1000
    assert (tmp_path / "kernels" / key / "kernel_config.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_triton_backend_without_cuda_is_a_clear_error(tmp_path):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode allows the triton backend on CPU")
    graph = lower(tiny_model("mixtral"))
    with pytest.raises(RuntimeError, match="backend 'triton' needs CUDA tensors"):
        resolve_pass("lower_kernels")({"backend": "triton"})(graph, PassContext(workdir=tmp_path, quiet=True))


SCRIPT = textwrap.dedent("""
    import torch
    from flexc.ir import lower
    from flexc.ir.testing import tiny_model
    from flexc.passes import PassContext, resolve_pass
    torch.set_num_threads(1)
    for family in ("qwen3_moe", "gpt_oss"):
        graph = lower(tiny_model(family))
        ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
        table = graph.widths(); table[:, ::3] = 16; table[:, 1] = 0
        graph.set_widths(table)
        with torch.no_grad():
            want = graph.logits(ids)
            r = resolve_pass("lower_kernels")({"backend": "triton", "granule": 16})(graph, PassContext(workdir="{tmp}/" + family, quiet=True))
            assert len(r.changed_nodes) == len(graph.groups), r.changed_nodes
            got = graph.logits(ids)
        print(family, float((got - want).abs().max()))
        assert (got - want).abs().max() < 1e-4
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA test below checks the real kernels; "
                    "Triton's interpreter does not run there with a CUDA device present")
def test_triton_backend_in_interpreter_matches_reference(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT.replace("{tmp}", str(tmp_path))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "qwen3_moe" in out.stdout and "gpt_oss" in out.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_auto_on_cuda_uses_triton_and_switches_widths(family, tmp_path):
    graph = lower(tiny_model(family).cuda(), {"input_ids": torch.randint(0, 97, (2, 8), device="cuda")})
    ids = torch.randint(0, 97, (3, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    table = graph.widths()
    table[:, ::3] = 16
    table[:, 1] = 0
    with torch.no_grad():
        want_full = graph.logits(ids)
        graph.set_widths(table)
        want_pruned = graph.logits(ids)
        result = resolve_pass("lower_kernels")({})(graph, PassContext(workdir=tmp_path, quiet=True))
        assert len(result.changed_nodes) == len(graph.groups)
        got_pruned = graph.logits(ids)
        graph.set_widths(None)  # switch back: no recompilation, same kernels
        got_full = graph.logits(ids)
    assert json.loads((tmp_path / "kernel_plan.json").read_text())["backend"] == "triton"
    assert (got_pruned - want_pruned).abs().max() < 1e-3
    assert (got_full - want_full).abs().max() < 1e-3
