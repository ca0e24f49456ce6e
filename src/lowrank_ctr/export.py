"""``lowrank-ctr-export``: a base or compressed checkpoint to ONNX or TorchScript, checked against PyTorch.

Writes ``OUT/model.onnx`` (or ``model.pt``), ``OUT/schema.json``, the vocabularies (``OUT/vocab/``, copied from
the prepared dataset) and the data config (``OUT/data_config.json``: how raw rows are read) so the model can be
served without this package's training code, and prints the max abs difference between the exported model and
PyTorch on a batch of another size. ``precision=int8`` (ONNX) quantises the model's Linear layers to onnxruntime
int8 MatMuls (lowrank_ctr.int8_inference.quantize_onnx); the difference is then against float32 PyTorch.

An export is complete or refused: it is written into a fresh temporary folder and renamed into place, it is
refused when the checkpoint's vocabularies are missing or are not the ones it was trained with, and it never merges
into an existing folder (a non-empty ``out=`` is refused unless ``overwrite=true``, which replaces an earlier export
only once the new one is complete). ``export.json`` records a fingerprint of the model file, schema, vocabularies
and data config; ``lowrank-ctr-predict`` checks it, so a folder whose files were replaced is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from lowrank_ctr.config import CONF_DIR, UserError, in_checkpoint, user_errors, user_message
from lowrank_ctr.data.batch import random_batch
from lowrank_ctr.data.encoding import check_vocabularies, id_fields, vocab_fingerprint
from lowrank_ctr.data.schema import Schema

INPUTS = ("cat", "num", "multi")
FORMATS = ("onnx", "torchscript")
EXPORT_PRECISIONS = ("32", "int8")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
EXPORT_FILE = "export.json"
DATA_CONFIG_FILE = "data_config.json"


class TensorInputs(nn.Module):
    """The model with positional tensor inputs (cat, num, multi) -> probabilities, for exporters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, cat: torch.Tensor, num: torch.Tensor, multi: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model({"cat": cat, "num": num, "multi": multi}))


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.digest()


def export_fingerprint(directory: Path, model_file: Path) -> str:
    """Hash of what must belong together in an export: model file, schema, vocabularies and data config."""
    directory = Path(directory)
    schema = Schema.load(directory)
    digest = hashlib.sha256(json.dumps(schema.signature(), sort_keys=True).encode())
    digest.update(vocab_fingerprint(directory / "vocab", id_fields(schema)).encode())
    digest.update(_file_digest(model_file))
    data_config = directory / DATA_CONFIG_FILE
    digest.update(_file_digest(data_config) if data_config.exists() else b"")
    return digest.hexdigest()[:32]


def check_destination(out: Path, overwrite: bool, ckpt_path: Path) -> None:
    """Refuse, before any work, an ``out`` that would mix two models or destroy something that is not an export."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file: give a directory for the export")
    ckpt = ckpt_path.expanduser().resolve()
    if out.resolve() in ckpt.parents:
        raise UserError(f"out={out} holds the checkpoint being exported ({ckpt_path}): choose another directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"out={out} already exists and is not empty: an export never merges into an old folder "
                            "(it would keep the other model's files); choose a new out=, or overwrite=true to replace "
                            "that export")
        if not (out / EXPORT_FILE).exists():
            raise UserError(f"out={out} is not a lowrank-ctr-export folder (no {EXPORT_FILE}): overwrite=true replaces "
                            "only an earlier export; choose a new out=")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished export to ``out``; an existing (empty, or overwritten) folder is removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(ckpt_path: str | Path, fmt: str, out: str | Path, batch_size: int = 64, overwrite: bool = False,
           precision: str = "32") -> dict[str, Any]:
    """``precision``: ``32``, or ``int8`` (ONNX only): the Linear layers as onnxruntime int8 MatMuls
    (lowrank_ctr.int8_inference.quantize_onnx); the printed difference is then against float32 PyTorch."""
    if fmt not in FORMATS:
        raise UserError(f"format={fmt!r} is not supported; use one of {list(FORMATS)}")
    precision = str(precision)
    if precision not in EXPORT_PRECISIONS:
        raise UserError(f"precision={precision} is not supported for export; use one of {list(EXPORT_PRECISIONS)}")
    if precision == "int8" and fmt != "onnx":
        raise UserError("precision=int8 exports ONNX only (onnxruntime's int8 MatMuls): use format=onnx, or serve the "
                        "checkpoint itself with lowrank-ctr-predict precision=int8")
    from lowrank_ctr.lightning.module import load_model

    out, ckpt_path = Path(out).expanduser(), Path(ckpt_path)
    check_destination(out, overwrite, ckpt_path)
    try:
        model, hp = load_model(ckpt_path)
    except RuntimeError as exc:  # tensor shapes that do not fit the model the checkpoint describes
        message = user_message(in_checkpoint(exc, ckpt_path))
        if message is None:
            raise
        raise UserError(message) from None
    schema = Schema.from_dict(hp["schema"])
    data_config = dict(hp.get("data_config") or {})
    data_dir = data_config.get("out_dir")
    vocab_src = Path(data_dir).expanduser() / "vocab" if data_dir else Path("<no data.out_dir in the checkpoint>")
    check_vocabularies(vocab_src, schema, fix=(
        f"the exported model could not encode raw rows. Prepare the dataset again from the raw files it was "
        f"trained on (lowrank-ctr-prepare data={data_config.get('name', 'NAME')} data.out_dir={data_dir} plus the "
        "data overrides of the training run), then export again"))

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        info = _write_export(tmp, model, hp, schema, data_config, vocab_src, fmt, batch_size, precision)
        info["checkpoint"] = str(ckpt_path)
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info["model"] = str(out / MODEL_FILES[fmt])
    return info


def _write_export(directory: Path, model: nn.Module, hp: dict[str, Any], schema: Schema, data_config: dict,
                  vocab_src: Path, fmt: str, batch_size: int, precision: str = "32") -> dict[str, Any]:
    wrapper = TensorInputs(model).eval()
    example = random_batch(schema, batch_size, torch.Generator().manual_seed(0))
    check = random_batch(schema, batch_size + 17, torch.Generator().manual_seed(1))  # another batch size
    args = tuple(example[k] for k in INPUTS)
    path = directory / MODEL_FILES[fmt]
    with torch.no_grad():
        expected = wrapper(*(check[k] for k in INPUTS)).numpy()
        if fmt == "onnx":
            float32 = path.with_name("model.float32.onnx") if precision == "int8" else path
            torch.onnx.export(wrapper, args, str(float32), input_names=list(INPUTS), output_names=["probability"],
                              dynamic_axes={**{k: {0: "batch"} for k in INPUTS}, "probability": {0: "batch"}},
                              opset_version=17, dynamo=False)
            if precision == "int8":
                from lowrank_ctr.int8_inference import quantize_onnx

                quantize_onnx(str(float32), str(path), model)
                float32.unlink()
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            inputs = [i.name for i in session.get_inputs()]  # inputs the model never reads are dropped
            got = session.run(None, {k: check[k].numpy() for k in inputs})[0]
        else:
            # frozen: weights become constants and TorchScript folds / fuses around them -- at batch 1 the
            # compressed model's many small ops ran 1.4x faster than traced-only (same process, 1 thread)
            traced = torch.jit.freeze(torch.jit.trace(wrapper, args).eval())
            traced.save(str(path))
            inputs = list(INPUTS)
            got = torch.jit.load(str(path))(*(check[k] for k in INPUTS)).numpy()
    schema.save(directory)
    (directory / DATA_CONFIG_FILE).write_text(json.dumps(data_config, indent=2, default=str))
    shutil.copytree(vocab_src, directory / "vocab")
    check_vocabularies(directory / "vocab", schema, fix="the copy is incomplete; export again")
    return {"format": fmt, "precision": precision, "max_abs_diff": float(abs(got - expected).max()), "inputs": inputs,
            "compression": (hp.get("compression_spec") or {}).get("method", "none"),
            "fingerprint": export_fingerprint(directory, path)}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def _main(cfg: DictConfig) -> None:
    with user_errors(where=f"out={cfg.get('out')}"):
        if not cfg.get("ckpt_path"):
            raise UserError("ckpt_path is required: lowrank-ctr-export ckpt_path=RUN/checkpoints/best.ckpt out=DIR")
        info = export(str(cfg.ckpt_path), str(cfg.format), Path(cfg.out), overwrite=bool(cfg.get("overwrite", False)),
                      precision=str(cfg.get("precision", "32")))
        against = "PyTorch float32 (int8 quantisation error)" if info["precision"] == "int8" else "PyTorch"
        print(f"exported {info['format']} -> {info['model']}  max abs diff vs {against}: {info['max_abs_diff']:.3g}")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
