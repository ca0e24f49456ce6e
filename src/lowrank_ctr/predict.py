"""``lowrank-ctr-predict``: raw rows in, one click probability per row out, in input order.

The model is an exported directory (``lowrank-ctr-export``: ONNX or TorchScript with ``schema.json``, ``vocab/``
and the data config), a checkpoint, or a training run directory (its compressed checkpoint if it has one). Raw rows
are read by the same reader and encoded by the same functions (``data/encoding.py``) as in training, with the saved
vocabularies: unseen or rare categories -> the OOV id, missing values -> the missing id / numeric 0.

Every input row gets exactly one output row. A row that cannot be split into the right columns stops the run with
its line number (the output is written to a temporary file and only renamed when complete); a value that cannot be
parsed (e.g. text in a numeric column) stops it too, unless ``on_bad_rows=missing`` reads such values as missing,
in which case their count is reported.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from omegaconf import DictConfig

from lowrank_ctr.config import CONF_DIR, UserError, user_errors
from lowrank_ctr.data import readers
from lowrank_ctr.data.batch import batch_arrays
from lowrank_ctr.data.encoding import Layout, encode_table, load_vocabularies
from lowrank_ctr.data.schema import Schema
from lowrank_ctr.data.synthetic import binary_auc
from lowrank_ctr.export import INPUTS, TensorInputs

log = logging.getLogger(__name__)

READABLE_FORMATS = ("criteo", "avazu", "tabular", "synthetic")
Scorer = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass
class ServedModel:
    """A model ready to score encoded batches, with what is needed to encode raw rows for it."""

    scorer: Scorer
    schema: Schema
    data_config: dict[str, Any]
    vocab_dir: Path
    source: str  # what was loaded, for messages


# Loading ------------------------------------------------------------------------------------------------------

def load_served_model(model: str | Path, threads: int | None = None) -> ServedModel:
    """``threads``: intra-op threads of whichever runtime scores (onnxruntime or torch); None keeps its default."""
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(f"model={model} does not exist: give a lowrank-ctr-export directory, a checkpoint (.ckpt) "
                        "or a training run directory")
    if path.is_dir() and (path / "export.json").exists():
        return _load_export(path, threads)
    if path.is_dir() and (path / "results.json").exists():
        results = json.loads((path / "results.json").read_text())
        ckpt = results.get("compress/checkpoint") or results.get("checkpoint")
        if not ckpt:
            raise UserError(f"run directory {path} has no checkpoint in results.json: the run did not finish "
                            "training; give a checkpoint or an export directory")
        return _load_checkpoint(Path(ckpt), threads)
    if path.is_file():
        return _load_checkpoint(path, threads)
    raise UserError(f"model={model} is a directory without export.json or results.json: give a lowrank-ctr-export "
                    "directory, a checkpoint (.ckpt) or a training run directory")


def torch_scorer(module: Any) -> Scorer:
    """A scorer around a torch module taking (cat, num, multi) tensors and returning probabilities."""
    import torch

    def score(arrays: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return module(*(torch.from_numpy(arrays[k]) for k in INPUTS)).numpy()

    return score


def onnx_scorer(path: Path, threads: int | None) -> Scorer:
    """A scorer around an onnxruntime session of an exported model (CPU, ``threads`` intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    declared = [i.name for i in session.get_inputs()]  # inputs the model never reads were dropped at export
    return lambda arrays: session.run(None, {k: arrays[k] for k in declared})[0]


def _load_checkpoint(path: Path, threads: int | None) -> ServedModel:
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    from lowrank_ctr.lightning.module import load_model

    try:
        model, hp = load_model(path)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    data_config = dict(hp.get("data_config") or {})
    return ServedModel(torch_scorer(TensorInputs(model).eval()), Schema.from_dict(hp["schema"]), data_config,
                       Path(data_config.get("out_dir", "")) / "vocab", f"checkpoint {path}")


def _load_export(path: Path, threads: int | None) -> ServedModel:
    info = json.loads((path / "export.json").read_text())
    schema = Schema.load(path)
    data_file = path / "data_config.json"
    data_config = json.loads(data_file.read_text()) if data_file.exists() else {"format": schema.extra.get("format")}
    if info["format"] == "onnx":
        score = onnx_scorer(path / "model.onnx", threads)
    else:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        score = torch_scorer(torch.jit.load(str(path / "model.pt"), map_location="cpu").eval())
    return ServedModel(score, schema, data_config, path / "vocab", f"{info['format']} export {path}")


# Reading raw rows ---------------------------------------------------------------------------------------------

def raw_columns(schema: Schema) -> readers.RawColumns:
    """The reader columns a schema was prepared from (bucketized numerics became categorical fields)."""
    bucketized = list(schema.extra.get("bucketized") or [])
    return readers.RawColumns(categorical=[f.name for f in schema.categorical if f.name not in bucketized],
                              numeric=bucketized + [f.name for f in schema.numeric],
                              multihot=[f.name for f in schema.multihot])


def raw_chunks(path: str, data_config: dict[str, Any], bad: readers.BadRows, block_size: int = 16 << 20
               ) -> Iterator[pa.Table]:
    """Reader chunks of a raw file in the format the model was trained on; the label column is optional."""
    fmt = data_config.get("format")
    if fmt not in READABLE_FORMATS:
        raise UserError(f"lowrank-ctr-predict reads raw {list(READABLE_FORMATS)} files; this model was trained on "
                        f"data.format={fmt!r}. Prepare the rows with lowrank-ctr-prepare and score the prepared "
                        "dataset with lowrank-ctr-compress / evaluate instead")
    if fmt in ("criteo", "synthetic"):  # the synthetic generator writes Criteo-format rows (write_criteo_tsv)
        return readers.criteo_reader(path, bad, block_size=block_size, label_optional=True)[1]
    if fmt == "avazu":
        return readers.avazu_reader(path, bad, block_size=block_size, label_optional=True)[1]
    return readers.tabular_reader(
        path, bad, label_col=data_config["label_col"], positive_labels=list(data_config.get("positive_labels") or []),
        categorical_cols=list(data_config.get("categorical_cols") or []),
        numeric_cols=list(data_config.get("numeric_cols") or []), delimiter=data_config.get("delimiter", ","),
        block_size=block_size, label_optional=True)[1]


# Prediction ---------------------------------------------------------------------------------------------------

def _score(scorer: Scorer, arrays: dict[str, np.ndarray], n: int, batch_size: int) -> np.ndarray:
    """Probabilities of ``n`` encoded rows, ``batch_size`` rows per model call."""
    parts = [np.asarray(scorer({k: arrays[k][i:i + batch_size] for k in INPUTS}), dtype=np.float32).reshape(-1)
             for i in range(0, n, batch_size)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def predict_file(served: ServedModel, input_path: str | Path, output_path: str | Path, batch_size: int = 4096,
                 on_bad_rows: str = "error") -> dict[str, Any]:
    """Score every row of a raw file into a CSV (``probability``, plus ``label`` when the file has labels)."""
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be >= 1")
    if on_bad_rows == "skip":
        raise UserError("on_bad_rows=skip would drop rows, but lowrank-ctr-predict writes one probability per input "
                        "row: use on_bad_rows=error (stop at the first bad row) or missing (read unparseable values "
                        "as missing)")
    t0 = time.perf_counter()
    schema = served.schema
    layout = Layout(raw_columns(schema), {"numeric_mode": schema.extra.get("numeric_mode", "dense"),
                                          "numeric_transform": schema.extra.get("numeric_transform", "log")})
    vocabs = load_vocabularies(served.vocab_dir, layout.categorical + layout.multihot)
    max_len = {f.name: f.max_len for f in schema.multihot}
    bad = readers.BadRows(on_bad_rows)
    output = Path(output_path).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    rows, labeled = 0, False
    labels, scores = [], []
    writer = None
    try:
        needed = layout.categorical + layout.multihot + layout.numeric
        for chunk in raw_chunks(str(input_path), served.data_config, bad):
            lacking = [c for c in needed if c not in chunk.column_names]
            if lacking:
                raise UserError(f"input={input_path} has no column(s) {lacking} that the model was trained on "
                                f"(its raw format: {served.data_config.get('format')}); give rows in that format")
            encoded = encode_table(chunk, layout, vocabs, max_len)
            arrays = batch_arrays(schema, encoded)
            probs = _score(served.scorer, arrays, chunk.num_rows, batch_size)
            labeled = chunk.column("label").type != pa.null()  # the reader found a label column
            columns = {"probability": pa.array(probs)}
            if labeled:
                columns["label"] = chunk.column("label")
                labels.append(arrays["label"])
                scores.append(probs)
            table = pa.table(columns)
            if writer is None:
                writer = pacsv.CSVWriter(tmp, table.schema, write_options=pacsv.WriteOptions(quoting_style="none"))
            writer.write_table(table)
            rows += chunk.num_rows
        if writer is None:
            raise UserError(f"input={input_path} holds no data rows to score")
        writer.close()
        writer = None
        tmp.replace(output)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {"rows": rows, "output": str(output), "model": served.source, "seconds": seconds,
                               "rows_per_second": rows / seconds if seconds else None,
                               "values_read_as_missing_rows": bad.repaired, "bad_value_examples": bad.examples}
    if labeled and labels:
        y, p = np.concatenate(labels), np.concatenate(scores)
        known = ~np.isnan(y)  # rows whose label could not be read (on_bad_rows=missing) are left out
        summary["labeled_rows"] = int(known.sum())
    if summary.get("labeled_rows"):
        summary["auc"] = binary_auc(y[known], p[known])
        clipped = np.clip(p[known].astype(np.float64), 1e-7, 1 - 1e-7)
        summary["logloss"] = float(-np.mean(y[known] * np.log(clipped) + (1 - y[known]) * np.log(1 - clipped)))
    return summary


@hydra.main(version_base="1.3", config_path=str(Path(CONF_DIR) / "serving"), config_name="predict")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        for key in ("model", "input", "output"):
            if not cfg.get(key):
                raise UserError(f"{key} is required: lowrank-ctr-predict model=EXPORT_DIR input=RAW_FILE "
                                "output=OUT.csv")
        served = load_served_model(str(cfg.model), cfg.get("threads"))
        summary = predict_file(served, str(cfg.input), str(cfg.output), int(cfg.batch_size), str(cfg.on_bad_rows))
    line = (f"wrote {summary['rows']:,} probabilities -> {summary['output']} "
            f"({summary['rows_per_second']:,.0f} rows/s, {served.source})")
    if "auc" in summary:
        line += f"  labeled rows: AUC {summary['auc']:.5f}  logloss {summary['logloss']:.5f}"
    print(line)
    if summary["values_read_as_missing_rows"]:
        print(f"warning: {summary['values_read_as_missing_rows']} rows had values that could not be parsed and were "
              f"read as missing (on_bad_rows=missing), e.g. {summary['bad_value_examples'][0]}")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
