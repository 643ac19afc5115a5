"""``flexc serve``: the artifact is checked before vLLM starts, and vLLM gets the plugin and the budget.

The server itself runs in tests/test_serving_online.py (vLLM's environment), started through
``flexc serve``; here, without vLLM, the command line and the refusals.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from flexc.cli import main
from flexc.serving.launch import server_environment
from serving_artifacts import BUDGETS, source_model, write_artifacts


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    model, tokenizer = source_model("tiny")
    return write_artifacts(model, tokenizer, tmp_path_factory.mktemp("serve-cli"))


def test_dry_run_passes_the_budget_and_vllms_own_arguments(artifacts, capsys):
    assert main(["serve", str(artifacts["nested"]), "--budget", str(BUDGETS[1]), "--port", "8123", "--dry-run",
                 "--", "--dtype", "float32", "--max-model-len", "256"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(artifacts["nested"])]
    overrides = cmd.index("--hf-overrides")
    assert json.loads(" ".join(cmd[overrides + 1: overrides + 3]).strip("'")) == {"flexc_budget": BUDGETS[1]}
    assert cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[-4:] == ["--dtype", "float32", "--max-model-len", "256"]


def test_the_experts_kernel_goes_to_vllm_with_the_budget_and_is_refused_for_a_sliced_checkpoint(artifacts, capsys):
    assert main(["serve", str(artifacts["nested"]), "--budget", str(BUDGETS[1]), "--experts-kernel", "flexc",
                 "--dry-run"]) == 0
    cmd = capsys.readouterr().out.split()
    overrides = cmd.index("--hf-overrides")
    assert json.loads(" ".join(cmd[overrides + 1: overrides + 5]).strip("'")) == {
        "flexc_budget": BUDGETS[1], "flexc_experts_kernel": "flexc"}
    assert main(["serve", str(artifacts[f"keep_{BUDGETS[0]:.2f}"]), "--experts-kernel", "flexc", "--dry-run"]) == 2
    assert "applies to nested artifacts only" in "".join(capsys.readouterr())


def test_a_budget_the_artifact_lacks_is_refused_with_the_exported_ones(artifacts, capsys):
    assert main(["serve", str(artifacts["nested"]), "--budget", "0.33", "--dry-run"]) == 2
    err = "".join(capsys.readouterr())
    assert "0.33" in err and all(f"{b:g}" in err for b in BUDGETS)


def test_a_sliced_checkpoint_is_served_at_its_own_budget_only(artifacts, capsys):
    sliced = artifacts[f"keep_{BUDGETS[0]:.2f}"]
    assert main(["serve", str(sliced), "--dry-run"]) == 0
    assert "--hf-overrides" not in capsys.readouterr().out
    assert main(["serve", str(sliced), "--budget", str(BUDGETS[0]), "--dry-run"]) == 2
    assert "sliced checkpoint holds one budget" in "".join(capsys.readouterr())


def test_per_request_budgets_add_the_processor_and_turn_prefix_caching_off(artifacts, capsys):
    from flexc.serving.launch import check_artifact, served_budgets
    from flexc.serving.requests import check_budget

    assert main(["serve", str(artifacts["nested"]), "--per-request-budgets", "--dry-run"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[cmd.index("--logits-processors") + 1] == "flexc.serving.requests:FlexcBudgets"
    assert "--no-enable-prefix-caching" in cmd
    assert ("--enforce-eager" in cmd) == torch.cuda.is_available()  # compiled on CPU; CUDA graphs not run yet
    served = served_budgets(check_artifact(artifacts["nested"], None, per_request=True))
    assert served == [1.0, *BUDGETS]  # what the server's admission check accepts
    assert check_budget(BUDGETS[1], served) == BUDGETS[1]
    with pytest.raises(ValueError, match=r"flexc_budget 0.33 is not a budget of the served artifact; available: 1, "
                                         r"0.75, 0.4"):
        check_budget(0.33, served)
    with pytest.raises(ValueError, match=r"keep ratio in \(0, 1\]; got 1.5"):
        check_budget("1.5", None)
    with pytest.raises(ValueError, match="must be a keep ratio"):
        check_budget("half", None)
    sliced = artifacts[f"keep_{BUDGETS[0]:.2f}"]
    assert main(["serve", str(sliced), "--per-request-budgets", "--dry-run"]) == 2
    assert "per-request budgets need the nested artifact" in "".join(capsys.readouterr())


def test_a_requests_choice_of_the_adaptive_policy_is_checked_on_admission():
    from types import SimpleNamespace

    from flexc.serving.requests import check_adaptive, requested_budget

    assert check_adaptive(True, available=True) is True and check_adaptive(False, available=False) is False
    with pytest.raises(ValueError, match="flexc_adaptive must be true or false; got 'yes'"):
        check_adaptive("yes", available=True)
    with pytest.raises(ValueError, match="flexc_adaptive: the served artifact has no token-adaptive policy"):
        check_adaptive(True, available=False)

    def asked(**extra):
        return requested_budget(SimpleNamespace(extra_args=extra or None))

    assert asked() is None  # neither: the request runs as the engine does
    assert asked(flexc_budget=0.5) == (0.5, None) and asked(flexc_adaptive=True) == (None, True)
    assert asked(flexc_budget="0.4", flexc_adaptive=False) == (0.4, False)


@pytest.mark.parametrize("which", ["missing", "stock"])
def test_what_is_not_a_flexc_artifact_is_refused(which, moe_dir, tmp_path, capsys):
    directory = tmp_path / "nothing" if which == "missing" else moe_dir
    assert main(["serve", str(directory), "--dry-run"]) == 2
    out = "".join(capsys.readouterr())
    assert ("no such directory" if which == "missing" else "is not a flexc artifact") in out


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_error_says_how_to_install_it(artifacts, capsys):
    assert main(["serve", str(artifacts["nested"])]) == 2
    out = "".join(capsys.readouterr())
    assert "vLLM is not installed" in out and "serve-cpu" in out


@pytest.mark.parametrize("before, after", [(None, "flexc"), ("", "flexc"), ("other", "other,flexc"),
                                           ("flexc,other", "flexc,other")])
def test_the_flexc_plugin_is_named_for_vllm(before, after):
    environ = {} if before is None else {"VLLM_PLUGINS": before}
    assert server_environment(environ)["VLLM_PLUGINS"] == after
