"""Export: base and compressed checkpoints to ONNX / TorchScript, run here in onnxruntime / TorchScript and compared
with PyTorch (not with export's own max_abs_diff); an export is complete or refused (issue 11, rule 2)."""

import importlib.util
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import TINY, compose_cfg, run_cli
from lowrank_ctr.config import UserError
from lowrank_ctr.data.batch import batch_arrays, random_batch
from lowrank_ctr.data.errors import DataError
from lowrank_ctr.data.schema import FieldSpec, Schema
from lowrank_ctr.export import INPUTS, TensorInputs, export
from lowrank_ctr.lightning.module import load_model
from lowrank_ctr.models import build_model
from lowrank_ctr.predict import load_served_model
from lowrank_ctr.train import run

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_onnxruntime = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed (pip install '.[export]')")
FORMATS = [pytest.param("onnx", marks=needs_onnxruntime), "torchscript"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Checkpoints of a tiny base model and of its AFM compression."""
    tmp = tmp_path_factory.mktemp("export")
    results = run(compose_cfg("train", TINY + ["model.mlp=[16,16]", "compression=afm", "bench=false",
                                               "compression.calibration_batches=2"], tmp / "run", tmp / "cache"))
    return {"base": results.get("base/checkpoint") or results["checkpoint"],
            "compressed": results["compress/checkpoint"]}


def prepared_test_rows(ckpt):
    """Real prepared test rows of the checkpoint's dataset, as model inputs."""
    _, hp = load_model(ckpt)
    schema = Schema.from_dict(hp["schema"])
    table = pq.read_table(f"{hp['data_config']['out_dir']}/test").sort_by("row_id")
    return {k: v for k, v in batch_arrays(schema, table).items() if k in INPUTS}


def run_exported(out, fmt, arrays):
    """The exported file itself, in its own runtime."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        return session.run(None, {i.name: arrays[i.name] for i in session.get_inputs()})[0]
    module = torch.jit.load(str(out / "model.pt"))
    with torch.no_grad():
        return module(*(torch.from_numpy(arrays[k]) for k in INPUTS)).numpy()


@pytest.mark.parametrize("which", ["base", "compressed"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_model_matches_pytorch_on_real_rows(trained, which, fmt, tmp_path):
    out = tmp_path / "out"
    info = export(trained[which], fmt, out)
    arrays = prepared_test_rows(trained[which])
    model, _ = load_model(trained[which])
    with torch.no_grad():
        expected = TensorInputs(model)(*(torch.from_numpy(arrays[k]) for k in INPUTS)).numpy()
    got = run_exported(out, fmt, arrays)
    assert got.shape == expected.shape == (len(arrays["cat"]),)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert expected.std() > 1e-3  # the comparison means something: predictions differ across rows
    assert (out / "schema.json").exists() and (out / "vocab" / "C1.parquet").exists()
    assert json.loads((out / "export.json").read_text())["fingerprint"] == info["fingerprint"]


@needs_onnxruntime
@pytest.mark.parametrize("which", ["base", "compressed"])
def test_int8_onnx_export_quantises_exactly_the_linear_layers(trained, which, tmp_path):
    import onnx

    from lowrank_ctr.int8_inference import int8_weights, quantize_for_inference

    out = tmp_path / "out"
    info = export(trained[which], "onnx", out, precision="int8")
    assert info["precision"] == "int8" and sorted(p.name for p in out.glob("*.onnx")) == ["model.onnx"]
    model, _ = load_model(trained[which])
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("MatMulInteger") == len(int8_weights(model)) > 0  # every hidden Linear, not the logit layer
    arrays = prepared_test_rows(trained[which])
    inputs = [torch.from_numpy(arrays[k]) for k in INPUTS]
    with torch.inference_mode():
        float32 = TensorInputs(model)(*inputs).numpy()
        torch_int8 = TensorInputs(quantize_for_inference(model))(*inputs).numpy()
    got = run_exported(out, "onnx", arrays)
    assert 0 < np.abs(got - float32).max() < 0.02 and np.abs(got - torch_int8).max() < 0.02
    assert np.corrcoef(got, float32)[0, 1] > 0.999
    served = load_served_model(out)  # predict scores an int8 export like any other
    np.testing.assert_allclose(served.scorer(arrays), got, atol=1e-6)
    with pytest.raises(UserError, match="ONNX only"):
        export(trained[which], "torchscript", tmp_path / "ts", precision="int8")
    with pytest.raises(UserError, match="not supported for export"):
        export(trained[which], "onnx", tmp_path / "x", precision="bf16-mixed")


def test_export_cli_prints_and_refuses_to_merge(trained, tmp_path):
    out = tmp_path / "out"
    r = run_cli(["lowrank-ctr-export", f"ckpt_path={trained['base']}", "format=torchscript", f"out={out}",
                 f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "max abs diff" in r.stdout and (out / "model.pt").exists()
    r = run_cli(["lowrank-ctr-export", f"ckpt_path={trained['compressed']}", "format=torchscript",
                 f"out={out}", f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 2 and "already exists and is not empty" in r.stderr and "overwrite=true" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert json.loads((out / "export.json").read_text())["compression"] == "none"  # the old export is untouched


def test_overwrite_replaces_the_old_export_whole(trained, tmp_path):
    out = tmp_path / "out"
    export(trained["base"], "torchscript", out)
    (out / "vocab" / "stale.parquet").write_bytes(b"from another model")
    (out / "notes.txt").write_text("x")
    export(trained["compressed"], "torchscript", out, overwrite=True)
    assert json.loads((out / "export.json").read_text())["compression"] == "afm"
    assert not (out / "notes.txt").exists() and not (out / "vocab" / "stale.parquet").exists()
    assert not list(tmp_path.glob(".out.*"))  # no temporary or old folder left behind
    other = tmp_path / "not_an_export"
    other.mkdir()
    (other / "results.json").write_text("{}")
    with pytest.raises(UserError, match="not a lowrank-ctr-export folder"):
        export(trained["base"], "torchscript", other, overwrite=True)
    assert (other / "results.json").exists()


def test_export_refused_without_the_prepared_vocabularies(trained, tmp_path):
    _, hp = load_model(trained["base"])
    data_dir = hp["data_config"]["out_dir"]
    hidden = tmp_path / "moved"
    shutil.move(data_dir, hidden)  # the data cache deleted
    try:
        with pytest.raises(DataError, match=r"vocabularies .* are missing .*lowrank-ctr-prepare data="):
            export(trained["base"], "torchscript", tmp_path / "out")
    finally:
        shutil.move(hidden, data_dir)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_predict_refuses_an_export_whose_files_do_not_belong_together(trained, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    export(trained["base"], "torchscript", a)
    export(trained["compressed"], "torchscript", b)
    load_served_model(a)  # intact: loads
    shutil.copy(b / "model.pt", a / "model.pt")  # another model's file merged in
    with pytest.raises(UserError, match="do not belong together"):
        load_served_model(a)
    victim = tmp_path / "c"
    export(trained["base"], "torchscript", victim)
    vocab = pq.read_table(victim / "vocab" / "C1.parquet")
    pq.write_table(vocab.slice(0, vocab.num_rows - 1), victim / "vocab" / "C1.parquet")  # a vocabulary changed
    with pytest.raises(DataError, match="not the ones the model was trained with"):
        load_served_model(victim)


@needs_onnxruntime
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
    r = run_cli(["lowrank-ctr-export", f"ckpt_path={trained['base']}", "format=tflite", f"out={tmp_path / 'o'}",
                 f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 2 and "format='tflite' is not supported" in r.stderr
    r = run_cli(["lowrank-ctr-export", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"out={tmp_path / 'o'}",
                 f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 2 and "does not exist" in r.stderr
