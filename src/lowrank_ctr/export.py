"""``lowrank-ctr-export``: a base or compressed checkpoint to ONNX or TorchScript, checked against PyTorch.

Writes ``OUT/model.onnx`` (or ``model.pt``), ``OUT/schema.json``, the vocabularies (``OUT/vocab/``, copied from
the prepared dataset) and the data config (``OUT/data_config.json``: how raw rows are read) so the model can be
served without this package's training code, and prints the max abs difference between the exported model and
PyTorch on real test rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from lowrank_ctr.config import CONF_DIR, UserError, user_errors
from lowrank_ctr.data.batch import random_batch
from lowrank_ctr.data.schema import Schema
from lowrank_ctr.lightning.module import load_model

INPUTS = ("cat", "num", "multi")
FORMATS = ("onnx", "torchscript")


class TensorInputs(nn.Module):
    """The model with positional tensor inputs (cat, num, multi) -> probabilities, for exporters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, cat: torch.Tensor, num: torch.Tensor, multi: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model({"cat": cat, "num": num, "multi": multi}))


def export(ckpt_path: str, fmt: str, out: Path, batch_size: int = 64) -> dict:
    if fmt not in FORMATS:
        raise UserError(f"format={fmt!r} is not supported; use one of {list(FORMATS)}")
    model, hp = load_model(ckpt_path)
    schema = Schema.from_dict(hp["schema"])
    wrapper = TensorInputs(model).eval()
    out.mkdir(parents=True, exist_ok=True)
    example = random_batch(schema, batch_size, torch.Generator().manual_seed(0))
    check = random_batch(schema, batch_size + 17, torch.Generator().manual_seed(1))  # another batch size
    args = tuple(example[k] for k in INPUTS)
    with torch.no_grad():
        expected = wrapper(*(check[k] for k in INPUTS)).numpy()
        if fmt == "onnx":
            path = out / "model.onnx"
            torch.onnx.export(wrapper, args, str(path), input_names=list(INPUTS), output_names=["probability"],
                              dynamic_axes={**{k: {0: "batch"} for k in INPUTS}, "probability": {0: "batch"}},
                              opset_version=17, dynamo=False)
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            declared = [i.name for i in session.get_inputs()]  # inputs the model never reads are dropped
            got = session.run(None, {k: check[k].numpy() for k in declared})[0]
        else:
            path = out / "model.pt"
            traced = torch.jit.trace(wrapper, args)
            traced.save(str(path))
            got = torch.jit.load(str(path))(*(check[k] for k in INPUTS)).numpy()
    max_diff = float(abs(got - expected).max())
    schema.save(out)
    data_config = dict(hp.get("data_config") or {})  # how raw rows are read, for lowrank-ctr-predict
    (out / "data_config.json").write_text(json.dumps(data_config, indent=2, default=str))
    data_dir = Path(data_config.get("out_dir", ""))
    if (data_dir / "vocab").is_dir():
        shutil.copytree(data_dir / "vocab", out / "vocab", dirs_exist_ok=True)
    inputs = declared if fmt == "onnx" else list(INPUTS)
    info = {"format": fmt, "model": str(path), "max_abs_diff": max_diff, "inputs": inputs,
            "compression": (hp.get("compression_spec") or {}).get("method", "none"), "checkpoint": str(ckpt_path)}
    (out / "export.json").write_text(json.dumps(info, indent=2))
    return info


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        if not cfg.get("ckpt_path"):
            raise UserError("ckpt_path is required: lowrank-ctr-export ckpt_path=RUN/checkpoints/best.ckpt out=DIR")
        info = export(str(cfg.ckpt_path), str(cfg.format), Path(cfg.out))
    print(f"exported {info['format']} -> {info['model']}  max abs diff vs PyTorch: {info['max_abs_diff']:.3g}")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
