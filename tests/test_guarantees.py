"""What the commands guarantee (issue 11), one table of cases per rule; each case breaks the rule on purpose.

Rule 1 (predict): never write over the input, the model, or an existing file unasked.
Rule 3: labels are what the config says they are; value ranges a format defines are checked in prepare and predict.
Rule 5: every error a user can cause is one line naming the file and the fix, including the operating system's,
        with no half-written output left; LOWRANK_CTR_DEBUG=1 keeps the traceback.
(Rule 2, exports complete or refused: tests/test_export.py.)
"""

import errno
import gzip
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from helpers import run_cli
from test_formats_registry import served_random_model
from lowrank_ctr import predict as predict_mod
from lowrank_ctr.config import UserError, user_errors
from lowrank_ctr.data import prepare as prepare_mod
from lowrank_ctr.data.errors import DataError
from lowrank_ctr.data.formats import get_format
from lowrank_ctr.data.prepare import prepare
from lowrank_ctr.data.schema import FieldSpec, Schema
from lowrank_ctr.models import build_model
from lowrank_ctr.predict import label_metrics, load_served_model, predict_file

CRITEO_OK = "\t".join(["1"] + ["3"] * 13 + ["ab"] * 26)


def criteo_cfg(path: Path, tmp: Path, **kw) -> dict:
    return dict(name="c", format="criteo", train_path=str(path), out_dir=str(tmp / "prepared"), **kw)


def tabular_cfg(path: Path, tmp: Path, **kw) -> dict:
    cfg = dict(name="t", format="tabular", train_path=str(path), label_col="y", positive_labels=["yes"],
               negative_labels=["no"], categorical_cols=["color"], numeric_cols=[], split=[1.0, 0.0, 0.0],
               out_dir=str(tmp / "prepared"))
    cfg.update(kw)
    return cfg


def one_line_error(fn, capsys, where="the test's output") -> tuple[int, str]:
    """Run ``fn`` as a command does (inside user_errors); return the exit code and the one stderr line."""
    with pytest.raises(SystemExit) as exit_:
        with user_errors(where=where):
            fn()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return exit_.value.code, lines[0]


@pytest.fixture
def criteo_model(tmp_path):
    """A tiny prepared Criteo-format dataset and a random model served with its vocabularies."""
    fmt = get_format("criteo")
    (tmp_path / "model").mkdir()
    cfg = fmt.example(tmp_path / "model")
    return served_random_model(prepare(cfg, progress=False), cfg), Path(cfg["train_path"])


# Rule 1: predict's output ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["input itself", "input via another path", "directory", "existing file",
                                  "model file", "overwrite"])
def test_rule1_predict_never_writes_over_its_input(case, criteo_model, tmp_path):
    served, rows = criteo_model
    before = rows.read_bytes()
    served.files = [rows.parent / "prepared" / "vocab"]
    existing = tmp_path / "old.csv"
    existing.write_text("probability\n0.5\n")
    output, expect = {
        "input itself": (rows, "is the input file"),
        "input via another path": (rows.parent / ".." / rows.parent.name / rows.name, "is the input file"),
        "directory": (tmp_path, "is a directory: give a file path"),
        "existing file": (existing, "already exists: choose another file, or overwrite=true"),
        "model file": (rows.parent / "prepared" / "vocab" / "C1.parquet", "is part of the model being served"),
        "overwrite": (existing, None),
    }[case]
    if expect is None:
        summary = predict_file(served, rows, output, overwrite=True)
        assert summary["rows"] == len(pd.read_csv(output)) == 40
    else:
        with pytest.raises(UserError, match=expect):
            predict_file(served, rows, output, overwrite=(case == "model file"))
        assert existing.read_text() == "probability\n0.5\n"
    assert rows.read_bytes() == before


def test_rule1_predict_cli_refuses_output_equal_to_input(tmp_path):
    rows = tmp_path / "rows.tsv"
    rows.write_text(CRITEO_OK + "\n")
    r = run_cli(["lowrank-ctr-predict", f"model={tmp_path / 'any-model'}", f"input={rows}", f"output={rows}",
                 f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: output={rows} is the input file: the predictions would replace the rows they are computed from; "
        "write them to another file"]
    assert rows.read_text() == CRITEO_OK + "\n"


@pytest.mark.parametrize("case", ["folder of other files", "file", "empty folder", "earlier dataset"])
def test_rule1_prepare_replaces_only_its_own_dataset(case, tmp_path):
    rows = _write(tmp_path / "c.txt", (CRITEO_OK + "\n").encode())
    out = tmp_path / "prepared"
    if case == "folder of other files":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif case == "file":
        out.write_text("not a folder")
    elif case == "empty folder":
        out.mkdir()
    else:
        prepare(criteo_cfg(rows, tmp_path, split=[1.0, 0.0, 0.0]), progress=False)
    again = criteo_cfg(rows, tmp_path, split=[1.0, 0.0, 0.0], min_count=2)
    if case in ("folder of other files", "file"):
        with pytest.raises(DataError, match=r"data\.out_dir=.*(holds files that are not a prepared dataset|is a file)"):
            prepare(again, progress=False)
        assert (out / "thesis.tex").exists() if case != "file" else out.read_text() == "not a folder"
    else:
        assert not prepare(again, progress=False).reused and (out / "summary.json").exists()


# Rule 3: labels and value ranges ---------------------------------------------------------------------------------

@pytest.mark.parametrize("labels,kw,expect", [
    (["yes", "no", "maybe", "yes", "maybe"], {},
     r"t\.csv:4: label column 'y' must be yes \(click\) or no \(no click\); unexpected values in the file: "
     r"'maybe' \(2 rows\)\. List such values"),
    (["yes", "no", "maybe", "yes", "maybe"], {"negative_labels": "other"}, 2),  # asked for: maybe means no click
    (["1", "0", "2", "1"], {"positive_labels": [1], "negative_labels": [0]}, r"'2' \(1 row\)"),
    (["1.0", "0", "1"], {"positive_labels": [1], "negative_labels": [0]}, r"'1\.0' \(1 row\)"),  # text, not numbers
    (["yes", "", "no"], {"negative_labels": "other"}, r"\(empty\) \(1 row\)"),  # empty is never a negative
    (["yes", "no", "maybe", "yes", "maybe"], {"on_bad_rows": "skip"}, 2),  # dropped and counted
    (["Yes", "no", "yes"], {}, r"'Yes' \(1 row\)"),  # case matters
])
def test_rule3_tabular_labels_are_what_the_config_says(labels, kw, expect, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("y,color\n" + "".join(f"{y},c{i % 2}\n" for i, y in enumerate(labels)))
    cfg = tabular_cfg(path, tmp_path, **kw)
    if isinstance(expect, str):
        with pytest.raises(DataError, match=expect):
            prepare(cfg, progress=False)
        assert not (tmp_path / "prepared").exists()
        return
    r = prepare(cfg, progress=False)
    train = pq.read_table(tmp_path / "prepared" / "train").to_pandas()
    assert int(train["label"].sum()) == expect
    assert len(train) + r.summary["bad_rows_skipped"] == len(labels)
    assert r.summary["bad_rows_skipped"] == (labels.count("maybe") if kw.get("on_bad_rows") == "skip" else 0)


def test_rule3_parquet_labels_counted_over_the_whole_file(tmp_path):
    pd.DataFrame({"y": [1, 0] * 300 + [2] * 5 + [1], "color": ["a"] * 606}).to_parquet(tmp_path / "t.parquet")
    cfg = tabular_cfg(tmp_path / "t.parquet", tmp_path, positive_labels=[1], negative_labels=[0])
    with pytest.raises(DataError, match=r"t\.parquet:601: .*unexpected values in the file: '2' \(5 rows\)"):
        prepare(cfg, progress=False)


def test_rule3_predict_metrics_only_over_labels_the_config_defines(tmp_path):
    path = tmp_path / "t.csv"
    labels = ["yes", "no", "no", "yes", "no", "no"] * 5
    path.write_text("y,color\n" + "".join(f"{y},c{i % 3}\n" for i, y in enumerate(labels)))
    cfg = tabular_cfg(path, tmp_path)
    served = served_random_model(prepare(cfg, progress=False), cfg)
    serving = tmp_path / "serve.csv"
    serving.write_text("y,color\n" + "".join(f"{y},c{i % 3}\n" for i, y in enumerate(["maybe", "yes", "no"] * 4)))
    with pytest.raises(DataError, match=r"serve\.csv:2: label column 'y' must be yes \(click\) or no \(no click\); "
                                        r"unexpected values in the file: 'maybe' \(4 rows\).*on_bad_rows=missing"):
        predict_file(served, serving, tmp_path / "p.csv")
    summary = predict_file(served, serving, tmp_path / "p.csv", on_bad_rows="missing")
    out = pd.read_csv(tmp_path / "p.csv")
    assert summary["rows"] == 12 and summary["unknown_label_rows"] == 4 and summary["labeled_rows"] == 8
    known = out["label"].notna().to_numpy()
    expected = label_metrics(out["label"].to_numpy(float)[known], out["probability"].to_numpy()[known])
    assert summary["auc"] == pytest.approx(expected["auc"]) and summary["logloss"] == pytest.approx(expected["logloss"])
    assert any("neither a click nor a no-click" in line for line in predict_mod.summary_lines(summary))


@pytest.mark.parametrize("hour,ok", [("14102123", True), ("14102100", True), ("14102124", False),
                                     ("14102199", False), ("14133100", False), ("14023012", False),
                                     ("1410210", False), ("14/10/21", False), ("", False)])
def test_rule3_avazu_hour_range_checked_in_prepare_and_predict(hour, ok, tmp_path):
    fmt = get_format("avazu")
    cfg = fmt.example(tmp_path)
    prepared = prepare(cfg, progress=False)
    served = served_random_model(prepared, cfg)
    lines = Path(cfg["train_path"]).read_text().splitlines()
    cells = lines[3].split(",")
    cells[2] = hour
    lines[3] = ",".join(cells)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    if ok:
        prepare({**cfg, "train_path": str(bad), "out_dir": str(tmp_path / "p2")}, progress=False)
        assert predict_file(served, bad, tmp_path / "p.csv")["rows"] == 30
        return
    rule = r"bad\.csv:4: column 'hour' must be YYMMDDHH \(a real date, hour 00-23\)"
    with pytest.raises(DataError, match=rule):
        prepare({**cfg, "train_path": str(bad), "out_dir": str(tmp_path / "p2")}, progress=False)
    with pytest.raises(DataError, match=rule):
        predict_file(served, bad, tmp_path / "p.csv")
    summary = predict_file(served, bad, tmp_path / "p.csv", on_bad_rows="missing")
    assert summary["values_read_as_missing_rows"] == 1 and summary["rows"] == 30


def test_rule3_movielens_rating_outside_its_stars_is_a_bad_row(tmp_path):
    fmt = get_format("movielens")
    cfg = fmt.example(tmp_path)
    ratings = pd.read_parquet(cfg["train_path"])
    ratings.loc[5, "rating"] = 7
    ratings.to_parquet(cfg["train_path"])
    with pytest.raises(DataError, match=r"ratings\.parquet:6: rating is not 0\.5-5 stars"):
        prepare(cfg, progress=False)
    assert prepare({**cfg, "on_bad_rows": "skip"}, progress=False).summary["bad_rows_skipped"] == 1


# Rule 5: one line, naming the file and the fix ------------------------------------------------------------------

def _size_mismatched_checkpoint(tmp_path: Path) -> Path:
    schema = Schema("s", [FieldSpec("a", "categorical", 10), FieldSpec("x", "numeric")])
    model = build_model("deepfm", schema, embedding_dim=4, mlp=[8])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": {"model_name": "deepfm", "schema": schema.to_dict(),
                                     "model_kwargs": {"embedding_dim": 8, "mlp": [8]}},  # not what was trained
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    return ckpt


def _raise_on_call(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _served(tmp: Path):
    fmt = get_format("criteo")
    (tmp / "m").mkdir(exist_ok=True)
    cfg = fmt.example(tmp / "m")
    return served_random_model(prepare(cfg, progress=False), cfg)


def _rows(tmp: Path) -> Path:
    return tmp / "m" / "criteo.txt"


def _prepare_criteo(tmp: Path, data: bytes = (CRITEO_OK + "\n").encode()):
    return lambda: prepare(criteo_cfg(_write(tmp / "c.txt", data), tmp))


def _not_utf8(tmp, mp):
    return _prepare_criteo(tmp, CRITEO_OK.encode() + b"\n" + CRITEO_OK.encode().replace(b"ab", b"a\xff", 1) + b"\n")


def _compressed_as_text(tmp, mp):
    return _prepare_criteo(tmp, gzip.compress((CRITEO_OK + "\n").encode() * 50))


def _full_disk(tmp, mp):
    mp.setattr(pq.ParquetWriter, "write_table", _raise_on_call(OSError(errno.ENOSPC, "No space left on device")))
    return _prepare_criteo(tmp)


def _read_only(tmp, mp):
    def mkdir(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    mp.setattr(Path, "mkdir", mkdir)
    return _prepare_criteo(tmp)


def _permission_denied(tmp, mp):  # pyarrow's way: the file in the message, no filename attribute
    mp.setattr(predict_mod.pacsv, "CSVWriter", _raise_on_call(PermissionError(
        13, f"Failed to open local file '{tmp}/.p.csv.tmp'. Detail: [errno 13] Permission denied")))
    return lambda: predict_file(_served(tmp), _rows(tmp), tmp / "p.csv")


def _output_is_directory(tmp, mp):
    return lambda: predict_file(_served(tmp), _rows(tmp), tmp)


def _shapes_do_not_fit(tmp, mp):
    return lambda: load_served_model(_size_mismatched_checkpoint(tmp))


def _key_of_wrong_type(tmp, mp):
    return lambda: prepare(tabular_cfg(tmp / "t.csv", tmp, categorical_cols="color"))


def _ctrl_c_preparing(tmp, mp):
    mp.setattr(prepare_mod, "encode_table", _raise_on_call(KeyboardInterrupt()))
    return _prepare_criteo(tmp)


def _ctrl_c_predicting(tmp, mp):
    mp.setattr(predict_mod, "encode_table", _raise_on_call(KeyboardInterrupt()))
    return lambda: predict_file(_served(tmp), _rows(tmp), tmp / "p.csv")


# case: (setup(tmp_path, monkeypatch) -> what the command runs, the stderr line (regex), exit code)
ONE_LINE_CASES = {
    "line that is not UTF-8 text": (
        _not_utf8,
        r"error: .*c\.txt:2: holds bytes that are not UTF-8 text\. Fix the row, or set data\.on_bad_rows=skip", 2),
    "binary (compressed) file given as text": (
        _compressed_as_text,
        r"error: .*c\.txt:1: holds bytes that are not UTF-8 text \(is c\.txt binary or compressed\? give the raw text",
        2),
    "full disk while preparing": (
        _full_disk, r"error: No space left on device: free some space, or write to another disk \(the test's output\)",
        2),
    "read-only disk while preparing": (
        _read_only, r"error: .*prepared\.tmp-\d+: the file system is read-only: check the permissions, or choose a "
                    r"location you can write to", 2),
    "permission denied writing predictions": (
        _permission_denied, r"error: Failed to open local file '.*\.p\.csv\.tmp'\. Detail: \[errno 13\] Permission "
                            r"denied: check the permissions", 2),
    "predictions into a directory": (_output_is_directory, r"error: output=.* is a directory: give a file path", 2),
    "checkpoint whose shapes do not fit its config": (
        _shapes_do_not_fit,
        r"error: .*model\.ckpt does not fit the model this config builds \(embedding\.[\w.]+: checkpoint \[\d+, 4\] vs "
        r"config \[\d+, 8\].*\): use the model settings it was trained with", 2),
    "data config key of the wrong type": (
        _key_of_wrong_type, r"error: data config: data\.categorical_cols='color' must be a list of column names", 2),
    "Ctrl-C while preparing": (_ctrl_c_preparing, r"interrupted \(Ctrl-C\): nothing half-written was kept", 130),
    "Ctrl-C while predicting": (_ctrl_c_predicting, r"interrupted \(Ctrl-C\)", 130),
}


@pytest.mark.parametrize("case", list(ONE_LINE_CASES))
def test_rule5_every_user_error_is_one_line(case, tmp_path, monkeypatch, capsys):
    setup, expect, code = ONE_LINE_CASES[case]
    if "predict" in case:
        _served(tmp_path)  # prepared before anything is broken
    fn = setup(tmp_path, monkeypatch)
    got_code, line = one_line_error(fn, capsys)
    assert got_code == code
    assert re.search(expect, line), line
    # state left safe: no temporary file or folder, no half-written output
    assert not list(tmp_path.rglob(".*.tmp-*")) and not (tmp_path / "p.csv").exists()
    if "preparing" in case or "text" in case or "disk" in case:
        assert not (tmp_path / "prepared").exists()


def test_rule5_debug_env_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CTR_DEBUG", "1")
    monkeypatch.setattr(pq.ParquetWriter, "write_table", _raise_on_call(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError, match="No space left"):
        with user_errors():
            prepare(criteo_cfg(_write(tmp_path / "c.txt", (CRITEO_OK + "\n").encode()), tmp_path), progress=False)


def test_rule5_non_text_lines_are_skippable_bad_rows(tmp_path):
    good = CRITEO_OK.encode()
    data = b"\n".join([good, good.replace(b"ab", b"\xfe\xff", 3), b"\x00\x01\xff\tgarbage", good, good]) + b"\n"
    r = prepare(criteo_cfg(_write(tmp_path / "c.txt", data), tmp_path, on_bad_rows="skip"), progress=False)
    assert r.summary["rows"]["train"] + r.summary["rows"]["valid"] + r.summary["rows"]["test"] == 3
    assert r.summary["bad_rows_skipped"] == 2
    assert any(":2: holds bytes that are not UTF-8 text" in e for e in r.summary["bad_row_examples"])
    assert any(":3: holds bytes that are not UTF-8 text" in e for e in r.summary["bad_row_examples"])


def test_rule5_cli_binary_garbage_is_one_line(tmp_path):
    garbage = _write(tmp_path / "train.txt", bytes(range(255, -1, -1)) * 40)  # starts with \xff
    r = run_cli(["lowrank-ctr-prepare", "data=criteo", f"data.train_path={garbage}", f"data.out_dir={tmp_path / 'o'}",
                 f"hydra.run.dir={tmp_path / 'log'}"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"error: {garbage}:1: holds bytes that are not UTF-8 text")
