"""int8 inference on CPU: the Linear layers of a model compute in int8 (dynamic quantization), for serving.

What practitioners run on CPUs without fast 16-bit matmuls: each ``nn.Linear`` becomes an int8 GEMM — weights int8
per output row (symmetric, scale = max |w_row| / 127), activations quantised per call from the batch's own
range (7-bit on x86, see ``REDUCE_RANGE``), int32 accumulation, float32 out — through torch's quantized engine
(fbgemm / oneDNN on x86, QNNPACK on ARM). A ReLU that directly follows a Linear in an ``nn.Sequential`` is fused
into it. Everything else (embedding lookups, FM / cross / attention arithmetic, the logit layer
``OutputLinear``, low-rank embedding codes) stays as it was, in float32.

It is a serving transform, not a training precision: the result shares every other tensor with the model it came
from, holds packed weights that are not saved in checkpoints, and runs on CPU only. It also serves the compressed
models: the factors of a low-rank Linear are two ``nn.Linear`` and are converted like any other, and the
``int8`` compression method's weight-only ``Int8Linear`` computes with exactly its stored int8 weights.

Measured AUC and speed: README, "Speed" (``int8`` inference).
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from lowrank_ctr.compression.methods.int8 import Int8Linear, quantize_rows

# x86 int8 kernels without VNNI multiply uint8 activations by int8 weights in pairs summed into int16
# (vpmaddubsw), which saturates with 8-bit activations (measured on AVX2, 624->400 layer: max error 0.43 vs 0.065
# with fbgemm, 0.042 vs 0.024 with oneDNN); 7-bit activations cannot saturate. ARM's QNNPACK does not need it.
REDUCE_RANGE = {"qnnpack": False}
# Which engine packs the weights (the packed weights then carry their kernels, whatever the global engine is):
# oneDNN's dynamic Linear measured 1.14x fbgemm's on an AVX2 CPU (624->400, batch 4096, 2 threads, best of 8).
PREFERRED_ENGINES = ("onednn", "x86", "fbgemm", "qnnpack")


def packing_engine() -> str:
    """The quantized engine the int8 Linears are packed for: the first of PREFERRED_ENGINES this torch has."""
    supported = torch.backends.quantized.supported_engines
    return next((e for e in PREFERRED_ENGINES if e in supported), torch.backends.quantized.engine)


@functools.cache  # a property of the torch build; inference() asks on every batch
def engine_problem() -> str | None:
    """Why this torch cannot run int8 inference, or None."""
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    try:
        ops = (torch.ops.quantized.linear_prepack, torch.ops.quantized.linear_dynamic,
               torch.ops.quantized.linear_relu_dynamic)
    except (AttributeError, RuntimeError):
        ops = ()
    if not engines or not ops:
        return (f"int8 inference needs torch's quantized engine (fbgemm / x86 / onednn / qnnpack) and its dynamic "
                f"Linear kernels, which torch {torch.__version__} lacks: serve at precision 32")
    return None


class DynamicInt8Linear(nn.Module):
    """y = act(x W^T + b) with W int8 per output row and x quantised per call (torch.ops.quantized.linear_dynamic).

    Inference only (no gradients, no state_dict entries: build it from a trained layer with :meth:`from_linear`).
    ``relu=True`` fuses a following ReLU into the kernel.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, relu: bool = False
                 ) -> None:
        super().__init__()
        problem = engine_problem()
        if problem:
            raise RuntimeError(problem)
        self.out_features, self.in_features = (int(s) for s in qweight.shape)
        self.relu = bool(relu)
        with warnings.catch_warnings():  # torch 2.13 announces the quantized tensor types' removal: engine_problem
            warnings.simplefilter("ignore", UserWarning)  # says so if a later torch no longer has them
            weight = torch._make_per_channel_quantized_tensor(
                qweight.detach().cpu().to(torch.int8), scale.detach().cpu().reshape(-1).to(torch.float64),
                torch.zeros(self.out_features, dtype=torch.long), 0)
        b = None if bias is None else bias.detach().cpu().float().contiguous()
        self.engine = packing_engine()
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.engine
        try:
            self._packed = torch.ops.quantized.linear_prepack(weight, b)
        finally:
            torch.backends.quantized.engine = previous
        self._reduce_range = REDUCE_RANGE.get(self.engine, True)

    @classmethod
    def from_linear(cls, layer: nn.Module, relu: bool = False) -> "DynamicInt8Linear":
        """From an ``nn.Linear`` (quantised here) or the int8 method's ``Int8Linear`` (its own int8 weights)."""
        if isinstance(layer, Int8Linear):
            return cls(layer.qweight, layer.scale.float(), layer.bias, relu)
        q, scale = quantize_rows(layer.weight)
        # quantize_rows keeps fp16 scales (what the int8 compression stores); the GEMM takes them as they are
        return cls(q, scale.float(), layer.bias, relu)

    def dequantized_weight(self) -> torch.Tensor:
        """The (out, in) float32 weight the kernel multiplies by."""
        weight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return weight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).float().contiguous()
        op = torch.ops.quantized.linear_relu_dynamic if self.relu else torch.ops.quantized.linear_dynamic
        return op(flat, self._packed, self._reduce_range).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int8 dynamic ({self.engine})"
                + (", relu" if self.relu else ""))


def _converts(module: nn.Module) -> bool:
    # models.layers.OutputLinear produces logits: float32 on purpose (AUC ranks them); other Linear subclasses may
    # compute otherwise, so only exact nn.Linear and the int8 method's Int8Linear convert
    return type(module) is nn.Linear or isinstance(module, Int8Linear)


def _convert_children(parent: nn.Module) -> int:
    converted = 0
    children = list(parent.named_children())
    for i, (name, child) in enumerate(children):
        if _converts(child):
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            fuse = isinstance(parent, nn.Sequential) and type(nxt) is nn.ReLU
            setattr(parent, name, DynamicInt8Linear.from_linear(child, relu=fuse))
            if fuse:
                setattr(parent, children[i + 1][0], nn.Identity())
            converted += 1
        else:
            converted += _convert_children(child)
    return converted


def quantize_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) whose Linear layers compute in int8; ``model`` itself is unchanged.

    The copy shares every parameter and buffer of ``model`` it does not replace (no second embedding table).
    Raises ValueError if the model has no Linear to convert and RuntimeError without a quantized engine.
    """
    problem = engine_problem()
    if problem:
        raise RuntimeError(problem)
    if any(t.device.type != "cpu" for t in itertools.chain(model.parameters(), model.buffers())):
        raise ValueError("int8 inference runs on CPU: move the model to the CPU first (model.cpu())")
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    served = copy.deepcopy(model, shared).eval()
    if _convert_children(served) == 0:
        raise ValueError(f"{type(model).__name__} has no Linear layer to run in int8: serve it at precision 32")
    return served


def int8_weights(model: nn.Module) -> list[torch.Tensor]:
    """The (out, in) float32 weights of the Linear layers :func:`quantize_for_inference` converts."""
    return [m.dequantized_weight() if isinstance(m, Int8Linear) else m.weight.detach().float()
            for m in model.modules() if _converts(m)]


class _DropPreprocessingAdvice(logging.Filter):
    """onnxruntime's quantizer logs, on the root logger, advice to run its shape-inference pre-processing (for
    static / CNN quantization; dynamic MatMul quantization does not need it): not shown to our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_onnx(src: str, dst: str, model: nn.Module) -> int:
    """onnxruntime's dynamic int8 quantization of the exported ``model`` (``src`` -> ``dst``), limited to the nodes
    of the Linear layers :func:`quantize_for_inference` converts: per output channel int8 weights, 7-bit (reduced
    range) weights for x86 CPUs without VNNI. Nodes are found by their weights, not by names (the exporter's node
    names follow call scopes, not module paths); their Gemms become MatMul + Add first, because onnxruntime
    quantises dynamic MatMuls only. Returns the number of int8 MatMuls in ``dst``; RuntimeError if a Linear was
    not found or not quantised."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weights = [w.cpu().numpy() for w in int8_weights(model)]
    proto = onnx.load(src)
    graph = proto.graph
    constants = {t.name: t for t in graph.initializer}

    def is_linear_weight(name: str, transposed: bool) -> bool:
        if name not in constants:
            return False
        array = numpy_helper.to_array(constants[name])
        return array.ndim == 2 and any(array.shape == w.shape and np.allclose(array, w, rtol=0, atol=1e-7)
                                       for w in (w.T if transposed else w for w in weights))

    nodes, rewritten = [], []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type == "Gemm" and attrs.get("transB") == 1 and not attrs.get("transA")
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
                and is_linear_weight(node.input[1], transposed=False)):
            weight_t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(constants[node.input[1]]).T),
                                               node.input[1] + "_t")
            graph.initializer.append(weight_t)
            product = node.name + "_matmul_out"
            matmul = helper.make_node("MatMul", [node.input[0], weight_t.name], [product if len(node.input) > 2 else
                                                                                 node.output[0]], node.name + "_MatMul")
            replacement = [matmul] + ([helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                                        node.name + "_Add")] if len(node.input) > 2 else [])
            rewritten.append((node, replacement))
            nodes.append(matmul.name)
        elif node.op_type == "MatMul" and len(node.input) == 2 and is_linear_weight(node.input[1], transposed=True):
            nodes.append(node.name)
    for node, replacement in rewritten:  # in place, keeping the graph's topological order
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(at + offset, new)
    if len(nodes) != len(weights):
        raise RuntimeError(f"found {len(nodes)} of the model's {len(weights)} Linear layers in the ONNX graph: "
                           "export with precision=32")
    staged = str(dst) + ".float32.onnx"
    onnx.save(proto, staged)
    root = logging.getLogger()
    advice = _DropPreprocessingAdvice()
    root.addFilter(advice)
    try:
        quantize_dynamic(staged, dst, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         nodes_to_quantize=nodes, op_types_to_quantize=["MatMul"])
    finally:
        root.removeFilter(advice)
        Path(staged).unlink(missing_ok=True)
    quantized = sum(n.op_type == "MatMulInteger" for n in onnx.load(dst).graph.node)
    if quantized != len(nodes):
        raise RuntimeError(f"onnxruntime quantised {quantized} of {len(nodes)} Linear layers: export with precision=32")
    return quantized
