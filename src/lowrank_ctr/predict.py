"""``lowrank-ctr-predict``: raw rows in, one click probability per row out, in input order.

The model is an exported directory (``lowrank-ctr-export``: ONNX or TorchScript with ``schema.json``, ``vocab/``
and the data config), a checkpoint, or a training run directory (its compressed checkpoint if it has one). Raw rows
are read by the reader of the model's dataset format (``data/formats/``, the same one preparation used) and encoded
by the same functions (``data/encoding.py``), with the saved vocabularies: unseen or rare categories -> the OOV id,
missing values -> the missing id / numeric 0. The vocabularies are checked against the model first (an export's
fingerprint, or the vocabulary fingerprint its schema recorded at preparation).

Every input row gets exactly one output row. A row that cannot be split into the right columns stops the run with
its line number (the output is written to a temporary file and only renamed when complete); a value that cannot be
parsed (e.g. text in a numeric column) or a label the data config does not define stops it too, unless
``on_bad_rows=missing`` reads such values as missing (labels as unknown, left out of the metrics), in which case
their count is reported. The output is never the input file, a file of the model, or a directory, and an existing
file is replaced only with ``overwrite=true``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from omegaconf import DictConfig

from lowrank_ctr.allocator import configure_malloc
from lowrank_ctr.config import CONF_DIR, UserError, in_checkpoint, user_errors, user_message
from lowrank_ctr.data import readers
from lowrank_ctr.data.batch import batch_arrays
from lowrank_ctr.data.encoding import Layout, check_vocabularies, encode_table, load_vocabularies
from lowrank_ctr.data.formats import get_format
from lowrank_ctr.data.schema import Schema
from lowrank_ctr.export import INPUTS, TensorInputs, export_fingerprint
from lowrank_ctr.pipeline.results import KEY_CHECKPOINT, KEY_COMPRESSED_CHECKPOINT, RESULTS_FILE

log = logging.getLogger(__name__)

Scorer = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass
class ServedModel:
    """A model ready to score encoded batches, with what is needed to encode raw rows for it."""

    scorer: Scorer
    schema: Schema
    data_config: dict[str, Any]
    vocab_dir: Path
    source: str  # what was loaded, for messages
    files: list[Path] = field(default_factory=list)  # what it was loaded from: predictions never overwrite these


# Loading ------------------------------------------------------------------------------------------------------

def load_served_model(model: str | Path, threads: int | None = None, precision: str = "32") -> ServedModel:
    """``threads``: intra-op threads of whichever runtime scores (onnxruntime or torch); None keeps its default.
    ``precision``: how a checkpoint's model computes (``32``, ``bf16-mixed``, or ``int8``: its Linear layers as
    int8 GEMMs, lowrank_ctr.int8_inference); an export scores as it was exported (float32)."""
    from lowrank_ctr.precision import inference_precision_problem

    precision = str(precision)
    problem = inference_precision_problem(precision, "cpu")
    if problem:
        raise UserError(problem)
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(f"model={model} does not exist: give a lowrank-ctr-export directory, a checkpoint (.ckpt) "
                        "or a training run directory")
    if path.is_dir() and (path / "export.json").exists():
        if precision != "32":
            raise UserError(f"precision={precision} applies to a checkpoint or a run directory; export {path} scores "
                            "at the precision it was exported with (lowrank-ctr-export precision=int8 writes an int8 "
                            "ONNX model): give the checkpoint instead, or leave precision=32")
        return _load_export(path, threads)
    if path.is_dir() and (path / RESULTS_FILE).exists():
        results = json.loads((path / RESULTS_FILE).read_text())
        # the model the run ended with; compress/checkpoint first for records older than base/checkpoint
        ckpt = results.get(KEY_COMPRESSED_CHECKPOINT) or results.get(KEY_CHECKPOINT)
        if not ckpt:
            raise UserError(f"run directory {path} has no checkpoint in results.json: the run did not finish "
                            "training; give a checkpoint or an export directory")
        return _load_checkpoint(Path(ckpt), threads, precision)
    if path.is_file():
        return _load_checkpoint(path, threads, precision)
    raise UserError(f"model={model} is a directory without export.json or results.json: give a lowrank-ctr-export "
                    "directory, a checkpoint (.ckpt) or a training run directory")


def torch_scorer(module: Any, precision: str = "32") -> Scorer:
    """A scorer around a torch module taking (cat, num, multi) tensors and returning probabilities, run under
    ``lowrank_ctr.precision.inference(precision)``."""
    import torch

    from lowrank_ctr.precision import inference

    def score(arrays: dict[str, np.ndarray]) -> np.ndarray:
        with inference(precision):
            return module(*(torch.from_numpy(arrays[k]) for k in INPUTS)).float().numpy()

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


def _load_checkpoint(path: Path, threads: int | None, precision: str = "32") -> ServedModel:
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    from lowrank_ctr.lightning.module import load_model

    try:
        model, hp = load_model(path)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    except RuntimeError as exc:  # tensor shapes that do not fit the model the checkpoint describes
        message = user_message(in_checkpoint(exc, path))
        if message is None:
            raise
        raise UserError(message) from None
    data_config = dict(hp.get("data_config") or {})
    schema = Schema.from_dict(hp["schema"])
    data_dir = data_config.get("out_dir")
    vocab_dir = Path(data_dir).expanduser() / "vocab" if data_dir else Path("<no data.out_dir in the checkpoint>")
    check_vocabularies(vocab_dir, schema, fix=f"the prepared dataset of checkpoint {path} is gone or was prepared "
                       "again; score with the model's lowrank-ctr-export directory (it carries its vocabularies), or "
                       "prepare the dataset again from the raw files it was trained on")
    from lowrank_ctr.precision import serving_model

    served = TensorInputs(serving_model(model.eval(), precision)).eval()
    source = f"checkpoint {path}" + (f" (precision {precision})" if precision != "32" else "")
    return ServedModel(torch_scorer(served, precision), schema, data_config, vocab_dir, source, [path, vocab_dir])


def _load_export(path: Path, threads: int | None) -> ServedModel:
    info = json.loads((path / "export.json").read_text())
    schema = Schema.load(path)
    data_file = path / "data_config.json"
    data_config = json.loads(data_file.read_text()) if data_file.exists() else {"format": schema.extra.get("format")}
    model_file = path / ("model.onnx" if info["format"] == "onnx" else "model.pt")
    again = "export the checkpoint again into a new folder (lowrank-ctr-export ckpt_path=... out=NEW_DIR)"
    check_vocabularies(path / "vocab", schema, fix=again)
    if "fingerprint" not in info:
        log.warning("export %s has no fingerprint (written by an older lowrank-ctr-export): its vocabularies cannot be "
                    "checked against the model; export it again to get one", path)
    elif export_fingerprint(path, model_file) != info["fingerprint"]:
        raise UserError(f"export {path}: the model, schema, vocabularies and data config in it do not belong together "
                        "(their fingerprint differs from export.json's: files were replaced or merged from another "
                        f"export), so raw values could get another model's ids: {again}")
    if info["format"] == "onnx":
        score = onnx_scorer(model_file, threads)
    else:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        score = torch_scorer(torch.jit.load(str(model_file), map_location="cpu").eval())
    return ServedModel(score, schema, data_config, path / "vocab", f"{info['format']} export {path}", [path])


# Reading raw rows ---------------------------------------------------------------------------------------------

def raw_columns(schema: Schema) -> readers.RawColumns:
    """The reader columns a schema was prepared from (bucketized numerics became categorical fields)."""
    bucketized = list(schema.extra.get("bucketized") or [])
    return readers.RawColumns(categorical=[f.name for f in schema.categorical if f.name not in bucketized],
                              numeric=bucketized + [f.name for f in schema.numeric],
                              multihot=[f.name for f in schema.multihot])


def raw_chunks(path: str, data_config: dict[str, Any], bad: readers.BadRows) -> Iterator[pa.Table]:
    """Reader chunks of a raw file in the format the model was trained on; the label column is optional."""
    fmt = get_format(data_config.get("format"))
    if fmt.cannot_predict:
        raise UserError(f"lowrank-ctr-predict cannot score raw data.format={fmt.name} rows: {fmt.cannot_predict}")
    return fmt.read(data_config, path, bad, label_optional=True)


# Prediction ---------------------------------------------------------------------------------------------------

def _score(scorer: Scorer, arrays: dict[str, np.ndarray], n: int, batch_size: int) -> np.ndarray:
    """Probabilities of ``n`` encoded rows, ``batch_size`` rows per model call."""
    parts = [np.asarray(scorer({k: arrays[k][i:i + batch_size] for k in INPUTS}), dtype=np.float32).reshape(-1)
             for i in range(0, n, batch_size)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def check_output(output_path: str | Path, input_path: str | Path, model_files: list[Path], overwrite: bool) -> Path:
    """Where predictions may go: never the input, never a file the model was loaded from, never a directory, and
    an existing file only with ``overwrite``. Checked before any work."""
    output = Path(output_path).expanduser()
    if output.is_dir():
        raise UserError(f"output={output} is a directory: give a file path, e.g. output={output / 'predictions.csv'}")
    target = output.resolve()
    if target == Path(input_path).expanduser().resolve():
        raise UserError(f"output={output} is the input file: the predictions would replace the rows they are "
                        "computed from; write them to another file")
    for f in model_files:
        f = f.expanduser().resolve()
        if target == f or f in target.parents:
            raise UserError(f"output={output} is part of the model being served ({f}): write the predictions "
                            "somewhere else")
    if output.exists() and not overwrite:
        raise UserError(f"output={output} already exists: choose another file, or overwrite=true to replace it")
    return output


def label_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """AUC and logloss of the rows with a known label (NaN: unknown), by the project's one implementation
    (``lowrank_ctr.metrics``); ``auc`` is None when those rows hold one class."""
    import torch

    from lowrank_ctr.metrics import binary_metrics

    known = ~np.isnan(labels)
    out: dict[str, Any] = {"labeled_rows": int(known.sum())}
    if out["labeled_rows"]:
        p = np.clip(probabilities[known].astype(np.float64), 1e-7, 1 - 1e-7)
        logits = torch.from_numpy(np.log(p) - np.log1p(-p))
        out.update(binary_metrics(logits, torch.from_numpy(labels[known]), "the labeled input rows"))
    return out


def predict_file(served: ServedModel, input_path: str | Path, output_path: str | Path, batch_size: int = 4096,
                 on_bad_rows: str = "error", overwrite: bool = False) -> dict[str, Any]:
    """Score every row of a raw file into a CSV (``probability``, plus ``label`` when the file has labels)."""
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be >= 1")
    if on_bad_rows == "skip":
        raise UserError("on_bad_rows=skip would drop rows, but lowrank-ctr-predict writes one probability per input "
                        "row: use on_bad_rows=error (stop at the first bad row) or missing (read unparseable values "
                        "as missing)")
    output = check_output(output_path, input_path, served.files, overwrite)
    t0 = time.perf_counter()
    schema = served.schema
    layout = Layout(raw_columns(schema), {"numeric_mode": schema.extra.get("numeric_mode", "dense"),
                                          "numeric_transform": schema.extra.get("numeric_transform", "log")})
    vocabs = load_vocabularies(served.vocab_dir, layout.categorical + layout.multihot)
    max_len = {f.name: f.max_len for f in schema.multihot}
    bad = readers.BadRows(on_bad_rows)
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
                               "values_read_as_missing_rows": bad.repaired, "unknown_label_rows": bad.unknown_labels,
                               "bad_value_examples": bad.examples}
    if labeled and labels:
        summary.update(label_metrics(np.concatenate(labels), np.concatenate(scores)))
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What lowrank-ctr-predict prints: the output, the metrics of labeled rows (undefined AUC said as such), and
    the rows whose values or labels were read as missing."""
    line = (f"wrote {summary['rows']:,} probabilities -> {summary['output']} "
            f"({summary['rows_per_second']:,.0f} rows/s, {summary['model']})")
    if "logloss" in summary:
        auc = "AUC undefined (one class)" if summary["auc"] is None else f"AUC {summary['auc']:.5f}"
        line += f"  labeled rows: {auc}  logloss {summary['logloss']:.5f}"
    lines = [line]
    if summary["values_read_as_missing_rows"]:
        lines.append(f"warning: {summary['values_read_as_missing_rows']} rows had values that could not be parsed and "
                     f"were read as missing (on_bad_rows=missing), e.g. {summary['bad_value_examples'][0]}")
    if summary["unknown_label_rows"]:
        lines.append(f"warning: {summary['unknown_label_rows']} rows had a label that is neither a click nor a "
                     "no-click value of the model's data config; they are scored but left out of the AUC and logloss")
    return lines


@hydra.main(version_base="1.3", config_path=str(Path(CONF_DIR) / "serving"), config_name="predict")
def _main(cfg: DictConfig) -> None:
    with user_errors(where=f"output={cfg.get('output')}"):
        for key in ("model", "input", "output"):
            if not cfg.get(key):
                raise UserError(f"{key} is required: lowrank-ctr-predict model=EXPORT_DIR input=RAW_FILE "
                                "output=OUT.csv")
        overwrite = bool(cfg.get("overwrite", False))
        check_output(str(cfg.output), str(cfg.input), [], overwrite)  # before the model is loaded
        configure_malloc(cfg.get("malloc"))  # an unknown value: one line naming the choices
        served = load_served_model(str(cfg.model), cfg.get("threads"), str(cfg.get("precision", "32")))
        summary = predict_file(served, str(cfg.input), str(cfg.output), int(cfg.batch_size), str(cfg.on_bad_rows),
                               overwrite=overwrite)
        for line in summary_lines(summary):
            print(line)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
