"""int8 inference (lowrank_ctr.int8_inference): the Linear layers as int8 GEMMs, checked against their arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_ctr import precision
from lowrank_ctr.compression.methods.int8 import Int8Linear, quantize_rows
from lowrank_ctr.compression.modules import LowRankLinear
from lowrank_ctr.data.batch import random_batch
from lowrank_ctr.data.schema import FieldSpec, Schema
from lowrank_ctr.int8_inference import DynamicInt8Linear, engine_problem, quantize_for_inference
from lowrank_ctr.models import build_model
from lowrank_ctr.models.layers import OutputLinear

pytestmark = pytest.mark.skipif(engine_problem() is not None, reason="this torch has no quantized engine")

SCHEMA = Schema("s", [FieldSpec(f"I{i}", "numeric") for i in range(2)]
                + [FieldSpec(f"C{i}", "categorical", vocab_size=v) for i, v in enumerate([30, 50, 20, 40])])


def activation_error_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|y_int8 - x W^T| per output when W is exact and x is rounded to one of 128 levels spanning [min(x, 0),
    max(x, 0)] (7-bit activations, x86's reduce_range): half a step per element times sum |W_row|."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = (hi - lo) / 127
    return 0.5 * step * weight.abs().sum(dim=1) * 1.01 + 1e-5  # 1%: float32 accumulation of the reference


def test_int8_linear_is_its_quantised_weights_times_the_rounded_input():
    torch.manual_seed(0)
    layer = nn.Linear(96, 40)
    q = DynamicInt8Linear.from_linear(layer)
    q_weight, scale = quantize_rows(layer.weight)
    deq = q_weight.float() * scale.float()
    torch.testing.assert_close(q.dequantized_weight(), deq, rtol=0, atol=1e-7)  # per-row symmetric int8
    x = torch.randn(257, 96) * 3
    y = q(x)
    exact = x @ deq.T + layer.bias.detach()
    err = (y - exact).abs()
    assert (err <= activation_error_bound(x, deq)).all(), float((err / activation_error_bound(x, deq)).max())
    assert err.max() > 0  # it really rounds the activations (not a float32 GEMM)
    x3 = torch.randn(5, 7, 96)  # leading dimensions are kept
    torch.testing.assert_close(q(x3), q(x3.reshape(35, 96)).reshape(5, 7, 40))


def test_fused_relu_and_the_int8_methods_own_weights():
    torch.manual_seed(1)
    layer = nn.Linear(32, 24)
    x = torch.randn(64, 32)
    plain, fused = DynamicInt8Linear.from_linear(layer), DynamicInt8Linear.from_linear(layer, relu=True)
    torch.testing.assert_close(fused(x), plain(x).relu(), rtol=0, atol=0)
    stored = Int8Linear.from_linear(layer)
    stored.qweight[0, 0] = 5  # its own weights are used, not a re-quantisation of a float weight
    torch.testing.assert_close(DynamicInt8Linear.from_linear(stored).dequantized_weight(),
                               stored.dequantized_weight(), rtol=0, atol=1e-7)


def test_model_copy_converts_hidden_linears_only_and_shares_the_rest():
    torch.manual_seed(2)
    model = build_model("deepfm", SCHEMA, embedding_dim=8, mlp=[32, 16]).eval()
    with torch.no_grad():  # trained-like scales: init std 0.01 would leave every logit ~0
        model.embedding.table.weight.normal_(0, 0.5)
    served = quantize_for_inference(model)
    net = served.mlp.net
    assert [type(m) for m in net] == [DynamicInt8Linear, nn.Identity, DynamicInt8Linear, nn.Identity, OutputLinear]
    assert net[0].relu and net[2].relu
    assert [type(m) for m in model.mlp.net] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, OutputLinear]  # unchanged
    assert served.embedding.table.weight.data_ptr() == model.embedding.table.weight.data_ptr()  # shared, not copied
    batch = random_batch(SCHEMA, 512, torch.Generator().manual_seed(3))
    with precision.inference("32"):
        ref = model(batch)
    with precision.inference("int8"):
        out = served(batch)
    assert out.dtype == torch.float32
    assert 0 < (out - ref).abs().max() < 0.02 * float(ref.std())
    ranks = lambda z: z.argsort().argsort().float()  # noqa: E731
    assert torch.corrcoef(torch.stack([ranks(out), ranks(ref)]))[0, 1] > 0.999


def test_compressed_linears_are_converted():
    torch.manual_seed(4)
    block = nn.Sequential(LowRankLinear(40, 30, rank=6), nn.ReLU(), Int8Linear.from_linear(nn.Linear(30, 8)))
    served = quantize_for_inference(block)
    assert isinstance(served[0].down, DynamicInt8Linear) and isinstance(served[0].up, DynamicInt8Linear)
    assert isinstance(served[1], nn.ReLU)  # the low-rank block is not a Linear: its ReLU stays separate
    assert isinstance(served[2], DynamicInt8Linear)
    x = torch.randn(100, 40)
    ref = block(x).detach()
    err = (served(x) - ref).abs().max()  # three 7-bit activation roundings in a row: ~9% of the spread here
    assert 0 < err < 0.15 * float(ref.std())


def test_errors_name_the_problem(monkeypatch):
    with pytest.raises(ValueError, match="no Linear layer"):
        quantize_for_inference(build_model("lr", SCHEMA))
    with pytest.raises(ValueError, match="CPU only"):
        with precision.inference("int8", "cuda"):
            pass
    assert precision.inference_precision_problem("bf16-true") is not None
    assert precision.serving_model(nn.Linear(2, 2), "32").__class__ is nn.Linear  # other precisions: the model


def test_bf16_on_a_cpu_without_bf16_kernels_is_flagged(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert "trainer.precision=32" in precision.precision_warning("bf16-mixed", "cpu")
    assert precision.precision_warning("32", "cpu") is None
    assert precision.precision_warning("bf16-mixed", "gpu") is None
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert precision.precision_warning("bf16-mixed", "cpu") is None
