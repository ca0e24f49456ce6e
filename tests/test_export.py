"""Export: base and compressed checkpoints to ONNX / TorchScript, checked against PyTorch."""

import json

import pytest
import torch

from helpers import TINY, compose_cfg, run_cli
from lowrank_ctr.data.batch import random_batch
from lowrank_ctr.data.schema import FieldSpec, Schema
from lowrank_ctr.export import INPUTS, TensorInputs
from lowrank_ctr.models import build_model
from lowrank_ctr.train import run

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    return run(compose_cfg("train", TINY + ["model.mlp=[16,16]", "compression=afm", "bench=false",
                                            "compression.calibration_batches=2"], tmp / "run", tmp / "cache"))


@pytest.mark.parametrize("which", ["checkpoint", "compress/checkpoint"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_cli_matches_pytorch(trained, which, fmt, tmp_path):
    out = tmp_path / "out"
    r = run_cli(["lowrank-ctr-export", f"ckpt_path={trained[which]}", f"format={fmt}", f"out={out}",
                 f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((out / "export.json").read_text())
    assert info["max_abs_diff"] < 1e-5 and "max abs diff" in r.stdout
    assert (out / "schema.json").exists() and (out / "vocab" / "C1.parquet").exists()
    assert (out / ("model.onnx" if fmt == "onnx" else "model.pt")).exists()


def test_multihot_model_exports_to_onnx(tmp_path):
    import onnxruntime as ort

    schema = Schema("mh", [FieldSpec("a", "categorical", 20), FieldSpec("tags", "multihot", 12, 4),
                           FieldSpec("x", "numeric")])
    wrapper = TensorInputs(build_model("deepfm", schema, embedding_dim=4, mlp=[8])).eval()
    example = random_batch(schema, 8)
    torch.onnx.export(wrapper, tuple(example[k] for k in INPUTS), str(tmp_path / "m.onnx"), input_names=list(INPUTS),
                      dynamic_axes={k: {0: "b"} for k in INPUTS}, opset_version=17, dynamo=False)
    check = random_batch(schema, 33, torch.Generator().manual_seed(3))
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {k: check[k].numpy() for k in INPUTS})[0]
    torch.testing.assert_close(torch.from_numpy(got), wrapper(*(check[k] for k in INPUTS)), atol=1e-6, rtol=1e-5)


def test_export_bad_format_and_missing_checkpoint(tmp_path, trained):
    r = run_cli(["lowrank-ctr-export", f"ckpt_path={trained['checkpoint']}", "format=tflite", f"out={tmp_path}",
                 f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 2 and "format='tflite' is not supported" in r.stderr
    r = run_cli(["lowrank-ctr-export", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"out={tmp_path}",
                 f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 2 and "does not exist" in r.stderr
