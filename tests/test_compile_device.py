"""A compile runs on the spec's device: calibration batches reach the passes on the model's device,
and on a CUDA GPU the whole method (Taylor ranking, gates, anneal, fold, exports) runs there and
gives the tables a CPU compile gives."""

from __future__ import annotations

import json

import pytest
import torch

import flexc
from flexc.passes import PassContext

PIPELINE = [{"rank_channels": {"score": "taylor"}}, "insert_action_gates", {"anneal": {"steps": 10}},
            "fold_masks"]


def test_calibration_batches_come_on_the_context_device(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    spec = flexc.Spec.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "data": {"calibration": {"builtin": "python-stdlib", "num_samples": 4, "seq_len": 32, "batch_size": 2}},
        "budgets": {"keep": [0.5]}, "export": {"dir": str(tmp_path / "out")}})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    on_cpu = list(PassContext(workdir=tmp_path, spec=spec, tokenizer=tokenizer).calibration_batches())
    on_meta = list(PassContext(workdir=tmp_path, spec=spec, tokenizer=tokenizer, device="meta").calibration_batches())
    assert [b.device.type for b in on_cpu] == ["cpu", "cpu"]
    assert [b.device.type for b in on_meta] == ["meta", "meta"]
    assert [b.shape for b in on_meta] == [b.shape for b in on_cpu]


def _compile(tiny_model_dir, out, device):
    spec = flexc.Spec.model_validate({
        "model": {"path": str(tiny_model_dir), "device": device},
        "data": {"calibration": {"builtin": "python-stdlib", "num_samples": 16, "seq_len": 64, "batch_size": 8}},
        "budgets": {"keep": [0.75, 0.5]}, "pipeline": PIPELINE,
        "export": {"dir": str(out), "formats": ["nested", "sliced"]}, "seed": 0})
    flexc.compile(spec, quiet=True)
    return json.loads((out / "nested" / "flexc_manifest.json").read_text())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_on_cuda_matches_cpu(tmp_path, tiny_model_dir):
    cuda = _compile(tiny_model_dir, tmp_path / "cuda", "cuda")
    cpu = _compile(tiny_model_dir, tmp_path / "cpu", "cpu")
    assert cuda["budgets"] == cpu["budgets"]
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    on_cpu = flexc.load(tmp_path / "cpu" / "nested", budget=0.5)
    on_cuda = flexc.load(tmp_path / "cuda" / "nested", budget=0.5, device="cuda")
    with torch.no_grad():
        want = on_cpu(ids).logits
        got = on_cuda(ids.cuda()).logits.cpu()
    # Different kernels and summation orders, and the anneal's choices may differ in near-ties:
    # the two nested models agree closely, not bitwise.
    assert (got - want).abs().max() < 0.5
