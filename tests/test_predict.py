"""lowrank-ctr-predict: raw rows -> one probability per row, in order, through the saved vocabularies."""

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import compose_cfg, run_cli
from test_readers_property import is_number  # a number (finite or not) or a blank
from lowrank_ctr.config import UserError
from lowrank_ctr.data import readers
from lowrank_ctr.data.batch import batch_arrays
from lowrank_ctr.data.errors import DataError
from lowrank_ctr.data.encoding import MISSING_INT
from lowrank_ctr.data.formats import get_format
from lowrank_ctr.data.formats.avazu import AVAZU_CATEGORICAL
from lowrank_ctr.data.schema import FIRST_VALUE_ID, OOV_ID
from lowrank_ctr.data.synthetic import SyntheticCriteo
from lowrank_ctr.export import export
from lowrank_ctr.predict import INPUTS, load_served_model, predict_file
from lowrank_ctr.train import run

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_onnxruntime = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed (pip install '.[export]')")
SERVING = "onnx" if HAS_ORT else "ts"  # the export the format-independent tests score with


def criteo_chunks(path, bad=None, **cfg):
    return get_format("criteo").read(cfg, path, bad or readers.BadRows())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A small DeepFM (AFM-compressed) trained on Criteo-format files, its exports, and a raw test file."""
    tmp = tmp_path_factory.mktemp("predict")
    lines = SyntheticCriteo(rows=4200, seed=0, max_vocab=200).write_criteo_tsv(tmp / "all.tsv").read_text()
    lines = lines.splitlines(keepends=True)
    files = {}
    for split, (a, b) in {"train": (0, 3000), "valid": (3000, 3500), "test": (3500, 4200)}.items():
        files[split] = tmp / f"{split}.tsv"
        files[split].write_text("".join(lines[a:b]))
    overrides = ["data=criteo", f"data.train_path={files['train']}", f"data.valid_path={files['valid']}",
                 f"data.test_path={files['test']}", "data.batch_size=256", "model.embedding_dim=4",
                 "model.mlp=[16,16]", "trainer.max_epochs=1", "progress_bar=false", "logger=none", "bench=false",
                 "compression=afm", "compression.calibration_batches=2"]
    results = run(compose_cfg("train", overrides, tmp / "run", tmp / "cache"))
    onnx_dir, ts_dir = tmp / "onnx", tmp / "ts"
    if HAS_ORT:
        export(results["compress/checkpoint"], "onnx", onnx_dir)
    export(results["compress/checkpoint"], "torchscript", ts_dir)
    return {"tmp": tmp, "results": results, "test": files["test"], "onnx": onnx_dir, "ts": ts_dir,
            "data_dir": tmp / "cache"}


def _expected(served, model_path):
    """The model's probabilities on the prepared test split, in file order (row_id)."""
    import pyarrow.parquet as pq

    model = load_served_model(model_path)
    data_dirs = [p for p in served["data_dir"].iterdir() if (p / "test").is_dir()]
    table = pq.read_table(data_dirs[0] / "test").sort_by("row_id")
    arrays = batch_arrays(model.schema, table)
    return model.scorer({k: arrays[k] for k in INPUTS}), arrays["label"]


@pytest.mark.parametrize("which", [pytest.param("onnx", marks=needs_onnxruntime), "ts", "checkpoint", "run_dir"])
def test_raw_rows_reproduce_prepared_predictions(served, which, tmp_path):
    model = {"onnx": served["onnx"], "ts": served["ts"], "checkpoint": served["results"]["compress/checkpoint"],
             "run_dir": served["results"]["run_dir"]}[which]
    summary = predict_file(load_served_model(model), served["test"], tmp_path / "p.csv", batch_size=97)
    out = pd.read_csv(tmp_path / "p.csv")
    expected, labels = _expected(served, served["results"]["compress/checkpoint"])
    n_input = len(served["test"].read_text().splitlines())
    assert summary["rows"] == len(out) == n_input == len(expected)
    np.testing.assert_allclose(out["probability"].to_numpy(), expected, atol=2e-6)  # same rows, same order
    np.testing.assert_array_equal(out["label"].to_numpy(), labels)
    assert summary["auc"] == pytest.approx(served["results"]["test/auc"], abs=1e-4)
    p = np.clip(expected.astype(np.float64), 1e-7, 1 - 1e-7)
    logloss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert summary["logloss"] == pytest.approx(logloss, abs=1e-5)


def test_int8_precision_scores_a_checkpoint_like_float32(served, tmp_path):
    ckpt = served["results"]["compress/checkpoint"]
    f32 = predict_file(load_served_model(ckpt), served["test"], tmp_path / "f.csv")
    int8 = load_served_model(ckpt, precision="int8")
    assert "precision int8" in int8.source
    summary = predict_file(int8, served["test"], tmp_path / "q.csv")
    p32, p8 = (pd.read_csv(tmp_path / name)["probability"].to_numpy() for name in ("f.csv", "q.csv"))
    assert summary["rows"] == f32["rows"] == len(p8)
    assert 0 < np.abs(p8 - p32).max() < 0.01  # int8 Linears: close to float32, not the float32 model itself
    assert summary["auc"] == pytest.approx(f32["auc"], abs=0.01)
    with pytest.raises(UserError, match="applies to a checkpoint"):
        load_served_model(served["ts"], precision="int8")
    with pytest.raises(UserError, match="not supported for inference"):
        load_served_model(ckpt, precision="bf16-true")


def test_unlabeled_rows_unseen_categories_and_missing_values(served, tmp_path):
    lines = served["test"].read_text().splitlines()[:50]
    fields = [line.split("\t")[1:] for line in lines]  # no label column, as in Kaggle's test.txt
    for row in fields[:10]:
        row[0] = ""  # I1 missing
        row[13] = "never-seen-category"  # C1 unseen
    raw = served["tmp"] / "unlabeled.tsv"
    raw.write_text("".join("\t".join(r) + "\n" for r in fields))
    model = load_served_model(served[SERVING])
    predict_file(model, raw, tmp_path / "p.csv")
    out = pd.read_csv(tmp_path / "p.csv")
    assert list(out.columns) == ["probability"] and len(out) == 50
    # the same rows encoded by hand: C1 -> OOV id, I1 -> numeric default 0
    labeled = served["tmp"] / "labeled.tsv"
    labeled.write_text("".join(line + "\n" for line in lines))
    predict_file(model, labeled, tmp_path / "q.csv")
    original = pd.read_csv(tmp_path / "q.csv")["probability"].to_numpy()
    np.testing.assert_allclose(out["probability"].to_numpy()[10:], original[10:], atol=1e-6)
    chunk = next(criteo_chunks(labeled))
    from lowrank_ctr.data.encoding import Layout, encode_table, load_vocabularies
    from lowrank_ctr.predict import raw_columns

    layout = Layout(raw_columns(model.schema), {"numeric_mode": "bucketize"})
    vocabs = load_vocabularies(served[SERVING] / "vocab", layout.categorical)
    arrays = batch_arrays(model.schema, encode_table(chunk, layout, vocabs, {}))
    names = [f.name for f in model.schema.categorical]
    c1, i1 = names.index("C1"), names.index("I1")  # criteo's default numeric_mode=bucketize: I1 is categorical
    assert (arrays["cat"][:10, c1] != OOV_ID).any()  # the change matters
    arrays["cat"][:10, c1] = OOV_ID
    i1_vocab = vocabs["I1"].to_pylist()
    arrays["cat"][:10, i1] = i1_vocab.index(MISSING_INT) + FIRST_VALUE_ID  # "missing" is a bucket seen in training
    np.testing.assert_allclose(out["probability"].to_numpy()[:10], model.scorer(arrays)[:10], atol=1e-6)


def test_bad_rows_stop_with_the_line_or_read_as_missing(served, tmp_path):
    lines = served["test"].read_text().splitlines()[:20]
    cells = lines[6].split("\t")
    cells[2] = "not-a-number"  # I2 of line 7
    bad_value = lines[:6] + ["\t".join(cells)] + lines[7:]
    f = tmp_path / "bad_value.tsv"
    f.write_text("\n".join(bad_value) + "\n")
    model = load_served_model(served[SERVING])
    with pytest.raises(DataError, match=r"bad_value\.tsv:7: column 'I2' is numeric.*on_bad_rows=missing"):
        predict_file(model, f, tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists() and not list(tmp_path.glob(".p.csv.tmp-*"))
    summary = predict_file(model, f, tmp_path / "p.csv", on_bad_rows="missing")
    assert summary["rows"] == 20 and summary["values_read_as_missing_rows"] == 1
    cells[2] = ""
    f2 = tmp_path / "blank.tsv"
    f2.write_text("\n".join(lines[:6] + ["\t".join(cells)] + lines[7:]) + "\n")
    predict_file(model, f2, tmp_path / "q.csv")
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "p.csv").to_numpy(), pd.read_csv(tmp_path / "q.csv").to_numpy())
    # a row that cannot be split into columns is never guessed at, whatever the policy
    short = tmp_path / "short.tsv"
    short.write_text("\n".join(lines[:4] + ["1\t2\t3"] + lines[4:]) + "\n")
    for policy in ("error", "missing"):
        with pytest.raises(DataError, match=r"short\.tsv:5: expected 40 columns, got 3"):
            predict_file(model, short, tmp_path / "r.csv", on_bad_rows=policy)
    with pytest.raises(UserError, match="one probability per input row"):
        predict_file(model, f, tmp_path / "r.csv", on_bad_rows="skip")


def test_rejected_rows_keep_exact_line_numbers_across_blocks(tmp_path):
    good = "\t".join(["1"] + ["3"] * 13 + ["ab"] * 26)
    lines = []
    for i in range(1, 3001):
        if i in (97, 1200, 2480):
            lines.append("0\t1\t2")  # wrong column count: rejected by the parser, possibly ahead of its batch
        elif i == 2500:
            lines.append("\t".join(["1", "x"] + ["3"] * 12 + ["ab"] * 26))  # bad value: found after parsing
        else:
            lines.append(good)
    f = tmp_path / "c.txt"
    f.write_text("\n".join(lines) + "\n")
    bad = readers.BadRows("skip")
    rows = sum(t.num_rows for t in criteo_chunks(f, bad, block_size=1 << 14))
    assert rows == 3000 - 3 - 1 and bad.skipped == 4
    assert any(e.startswith(f"{f}:2500: column 'I1'") for e in bad.examples), bad.examples
    assert f"{f}:97: expected 40 columns, got 3" in bad.examples


def test_predict_cli(served, tmp_path):
    out = tmp_path / "p.csv"
    r = run_cli(["lowrank-ctr-predict", f"model={served[SERVING]}", f"input={served['test']}", f"output={out}",
                 f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote {len(served['test'].read_text().splitlines())} probabilities" in r.stdout
    expected, _ = _expected(served, served["results"]["compress/checkpoint"])
    np.testing.assert_allclose(pd.read_csv(out)["probability"].to_numpy(), expected, atol=2e-6)
    auc = float(r.stdout.split("AUC ")[1].split()[0])
    assert auc == pytest.approx(served["results"]["test/auc"], abs=1e-4)
    r = run_cli(["lowrank-ctr-predict", f"model={tmp_path / 'nope'}", f"input={served['test']}",
                 f"output={tmp_path / 'q.csv'}", f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli(["lowrank-ctr-predict", f"model={served[SERVING]}", f"output={out}",
                 f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 2 and "input is required" in r.stderr
    r = run_cli(["lowrank-ctr-predict", f"model={served[SERVING]}", f"input={served['test']}",
                 f"output={tmp_path / 'm.csv'}", "malloc=jemalloc", f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 2 and "malloc must be one of tuned, default" in r.stderr
    assert not (tmp_path / "m.csv").exists()
    assert json.loads((served[SERVING] / "data_config.json").read_text())["format"] == "criteo"


def test_avazu_and_tabular_files_may_lack_the_label(tmp_path):
    cols = {"id": ["1", "2", "3"], "click": ["0", "1", "0"], "hour": ["14102100", "14102113", "14102223"],
            **{c: [f"{c}a", f"{c}b", ""] for c in AVAZU_CATEGORICAL}}
    labeled, unlabeled = pd.DataFrame(cols), pd.DataFrame(cols).drop(columns=["click"])
    labeled.to_csv(tmp_path / "l.csv", index=False)
    unlabeled.to_csv(tmp_path / "u.csv", index=False)
    avazu = get_format("avazu")
    a = next(avazu.read({}, tmp_path / "l.csv", readers.BadRows(), label_optional=True))
    b = next(avazu.read({}, tmp_path / "u.csv", readers.BadRows(), label_optional=True))
    assert a.column("label").to_pylist() == [0, 1, 0] and str(b.column("label").type) == "null"
    assert a.drop_columns(["label"]).equals(b.drop_columns(["label"]))
    assert b.column("hour_of_day").to_pylist() == ["00", "13", "23"]
    with pytest.raises(DataError, match=r"column\(s\) \['click'\] not found"):  # training still needs labels
        next(avazu.read({}, tmp_path / "u.csv", readers.BadRows()))

    table = pd.DataFrame({"color": ["red", "blue"], "size": [1.0, 2.0]})
    table.to_parquet(tmp_path / "u.parquet")
    cfg = dict(label_col="y", positive_labels=["yes"], negative_labels=["no"], categorical_cols=["color"],
               numeric_cols=["size"])
    t = next(get_format("tabular").read(cfg, tmp_path / "u.parquet", readers.BadRows(), label_optional=True))
    assert str(t.column("label").type) == "null" and t.column("color").to_pylist() == ["red", "blue"]


def test_synthetic_model_scores_its_test_split_written_by_prepare_raw_out(tmp_path):
    """data=synthetic: lowrank-ctr-prepare raw_out=FILE split=test writes the raw rows of the test split the model was
    evaluated on; predicting them reproduces the model's test predictions row by row, and its test AUC."""
    from helpers import TINY

    results = run(compose_cfg("train", [*TINY, "model.mlp=[16]", "bench=false"], tmp_path / "run", tmp_path / "cache"))
    served = load_served_model(results["checkpoint"])
    data_cfg = served.data_config
    r = run_cli(["lowrank-ctr-prepare", "data=synthetic", *[o for o in TINY if o.startswith("data.")],
                 f"paths.data_dir={tmp_path / 'cache'}", f"raw_out={tmp_path / 'test.tsv'}", "split=test",
                 f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    summary = predict_file(served, tmp_path / "test.tsv", tmp_path / "p.csv")
    import pyarrow.parquet as pq

    table = pq.read_table(f"{data_cfg['out_dir']}/test").sort_by("row_id")
    arrays = batch_arrays(served.schema, table)
    assert f"wrote {table.num_rows:,} raw rows (test split)" in r.stdout and summary["rows"] == table.num_rows
    np.testing.assert_allclose(pd.read_csv(tmp_path / "p.csv")["probability"].to_numpy(),
                               served.scorer({k: arrays[k] for k in INPUTS}), atol=2e-6)
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "p.csv")["label"].to_numpy(), arrays["label"])
    assert summary["auc"] == pytest.approx(results["test/auc"], abs=1e-4)
    again = run_cli(["lowrank-ctr-prepare", "data=synthetic", f"raw_out={tmp_path / 'test.tsv'}",
                     f"hydra.run.dir={tmp_path / 'log'}"])
    assert again.returncode == 2 and "already exists" in again.stderr  # never overwritten unasked


junk = st.text(alphabet="abcxyz-. ", min_size=1, max_size=4)  # never a number, sometimes blank
numeric_cell = st.one_of(st.integers(-10**6, 10**6).map(str), st.sampled_from(["", "nan", "inf", "1e400"]), junk)
serving_row = st.tuples(st.one_of(st.sampled_from(["0", "1"]), junk), st.lists(numeric_cell, min_size=13, max_size=13),
                        st.lists(st.one_of(st.text(alphabet="0123456789abcdef", max_size=8), junk), min_size=26,
                                 max_size=26))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(serving_row, min_size=1, max_size=10))
def test_missing_policy_scores_every_row_as_if_bad_values_were_blank(served, tmp_path_factory, rows):
    """Property: on_bad_rows=missing writes one probability per row, equal to the row with its bad values blanked."""
    tmp = tmp_path_factory.mktemp("prop")
    messy = ["\t".join([label, *nums, *cats]) for label, nums, cats in rows]
    clean = ["\t".join(["0", *(n if is_number(n) else "" for n in nums), *cats]) for _, nums, cats in rows]
    (tmp / "messy.tsv").write_text("\n".join(messy) + "\n")
    (tmp / "clean.tsv").write_text("\n".join(clean) + "\n")
    model = load_served_model(served[SERVING])
    summary = predict_file(model, tmp / "messy.tsv", tmp / "m.csv", on_bad_rows="missing")
    predict_file(model, tmp / "clean.tsv", tmp / "c.csv")  # the clean file parses under the strict policy
    got = pd.read_csv(tmp / "m.csv")["probability"].to_numpy()
    assert summary["rows"] == len(got) == len(rows)
    np.testing.assert_allclose(got, pd.read_csv(tmp / "c.csv")["probability"].to_numpy(), atol=1e-6)
