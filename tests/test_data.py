"""Data layer: readers, preparation, cache, bad input, streaming batches."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import sample
from lowrank_ctr.data import datamodule
from lowrank_ctr.data import prepare as prep_mod
from lowrank_ctr.data.datamodule import CTRDataModule, InMemoryBatches, ShardedBatches, batch_sizes
from lowrank_ctr.data.encoding import bucketize
from lowrank_ctr.data.errors import DataError
from lowrank_ctr.data.prepare import prepare
from lowrank_ctr.data.schema import OOV_ID, Schema
from lowrank_ctr.data.synthetic import SyntheticCriteo
from lowrank_ctr.metrics import binary_metrics


def criteo_cfg(out, **kw):
    cfg = dict(name="criteo_sample", format="criteo", train_path=str(sample("criteo_sample", "train.txt")),
               valid_path=str(sample("criteo_sample", "valid.txt")), test_path=str(sample("criteo_sample", "test.txt")),
               min_count=2, numeric_mode="bucketize", out_dir=str(out))
    cfg.update(kw)
    return cfg


def read_split(path, split):
    return pq.read_table(Path(path) / split).to_pandas()


# Real samples ----------------------------------------------------------------------------------------------

def test_criteo_sample_rows_schema_and_oov(tmp_path):
    r = prepare(criteo_cfg(tmp_path / "c"), progress=False)
    assert r.summary["rows"] == {"train": 7200, "valid": 409, "test": 391}
    assert r.summary["bad_rows_skipped"] == 0
    assert [f.name for f in r.schema.categorical][:2] == ["C1", "C2"]
    assert len(r.schema.categorical) == 39 and not r.schema.numeric  # 13 numerics bucketized into categories
    train = read_split(tmp_path / "c", "train")
    # every vocabulary value occurs >= min_count times in train; anything rarer is OOV
    raw = __import__("pandas").read_csv(sample("criteo_sample", "train.txt"), sep="\t", header=None, dtype=str)
    c3_counts = raw[16].fillna("").value_counts()  # column 16 = C3
    vocab = pq.read_table(tmp_path / "c" / "vocab" / "C3.parquet").to_pandas()
    assert (vocab["count"] >= 2).all()
    assert set(vocab["value"]) == set(c3_counts[c3_counts >= 2].index)
    singletons = set(c3_counts[c3_counts == 1].index)
    is_single = raw[16].fillna("").isin(singletons).to_numpy()
    assert (train.sort_values("row_id")["C3"].to_numpy()[is_single] == OOV_ID).all()
    # most frequent value gets the first id
    top = c3_counts.index[0]
    assert (train["C3"].to_numpy()[(raw[16].fillna("") == top).to_numpy()] == 2).all()
    # valid rows with values never seen in train map to OOV
    valid = read_split(tmp_path / "c", "valid")
    assert (valid["C3"] == OOV_ID).any()


def test_criteo_numeric_modes(tmp_path):
    r = prepare(criteo_cfg(tmp_path / "d", numeric_mode="dense"), progress=False)
    assert [f.name for f in r.schema.numeric] == [f"I{i}" for i in range(1, 14)]
    train = read_split(tmp_path / "d", "train").sort_values("row_id")
    # first row of the file: I1=1, I2=1, I3=5, I12 empty -> 0
    assert train["I3"].iloc[0] == pytest.approx(np.log1p(5.0), rel=1e-6)
    assert train["I12"].iloc[0] == 0.0
    # bucketize: x > 2 -> floor(log(x)^2), as a category
    assert bucketize(__import__("pyarrow").array([1382.0, 2.0, -1.0, None])).to_pylist()[:3] == [
        int(np.floor(np.log(1382.0) ** 2)), 2, -1]


def test_avazu_sample(tmp_path):
    cfg = dict(name="avazu_sample", format="avazu", min_count=2, out_dir=str(tmp_path / "a"),
               train_path=[str(sample("avazu_sample", "valid.csv")), str(sample("avazu_sample", "test.csv"))])
    r = prepare(cfg, progress=False)
    assert sum(r.summary["rows"].values()) == 480 + 432
    names = [f.name for f in r.schema.fields]
    assert "hour_of_day" in names and "weekday" in names and "id" not in names and "hour" not in names
    assert len(names) == 23
    vocab = pq.read_table(tmp_path / "a" / "vocab" / "hour_of_day.parquet").column("value").to_pylist()
    assert set(vocab) <= {f"{h:02d}" for h in range(24)}


def test_movielens_multihot(tmp_path):
    cfg = dict(name="ml", format="movielens", train_path=str(sample("movielens100k", "ratings.parquet")),
               out_dir=str(tmp_path / "m"))
    r = prepare(cfg, progress=False)
    assert sum(r.summary["rows"].values()) == 100_000
    genres = r.schema.multihot[0]
    assert genres.name == "genres" and genres.max_len == 6
    import pandas as pd

    ratings = pd.read_parquet(sample("movielens100k", "ratings.parquet"))
    total_pos = sum(r.summary["positive_rate"][s] * r.summary["rows"][s] for s in r.summary["rows"])
    assert round(total_pos) == int((ratings["rating"] >= 4).sum())
    ds = ShardedBatches(tmp_path / "m" / "train", r.schema, 512)
    b = next(iter(ds))
    assert b["multi"].shape == (512, 1, 6) and (b["multi"][:, 0, 0] >= 2).all()  # every movie has >= 1 genre


# Tabular, synthetic -------------------------------------------------------------------------------------------

def write_csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def tabular_cfg(path, out, **kw):
    cfg = dict(name="t", format="tabular", train_path=str(path), label_col="y", positive_labels=["yes"],
               negative_labels=["no"], categorical_cols=["color"], numeric_cols=["size"], out_dir=str(out),
               split=[0.6, 0.2, 0.2])
    cfg.update(kw)
    return cfg


def test_tabular_csv_and_parquet(tmp_path):
    rows = ["y,color,size,unused"] + [f"{'yes' if i % 3 == 0 else 'no'},{['red', 'blue', ''][i % 3]},{i},x"
                                      for i in range(300)]
    csv = write_csv(tmp_path / "t.csv", rows)
    r = prepare(tabular_cfg(csv, tmp_path / "o1"), progress=False)
    assert sum(r.summary["rows"].values()) == 300
    assert abs(sum(r.summary["positive_rate"][s] * r.summary["rows"][s] for s in r.summary["rows"]) - 100) < 1e-6
    assert [f.name for f in r.schema.fields] == ["color", "size"]
    import pandas as pd

    pq_path = tmp_path / "t.parquet"
    pd.read_csv(csv, keep_default_na=False).to_parquet(pq_path)
    r2 = prepare(tabular_cfg(pq_path, tmp_path / "o2"), progress=False)
    assert r2.summary["rows"] == r.summary["rows"]


def test_synthetic_deterministic_and_shaped(tmp_path):
    cfg = dict(name="s", format="synthetic", rows=30_000, seed=3, max_vocab=5000, min_count=1)
    a = prepare({**cfg, "out_dir": str(tmp_path / "a")}, progress=False)
    prepare({**cfg, "out_dir": str(tmp_path / "b")}, progress=False)
    assert sum(a.summary["rows"].values()) == 30_000
    ta, tb = read_split(tmp_path / "a", "train"), read_split(tmp_path / "b", "train")
    assert ta.equals(tb)
    assert len(a.schema.categorical) == 26 and len(a.schema.numeric) == 13
    assert 0.2 < a.summary["positive_rate"]["train"] < 0.3
    assert 0.7 < a.summary["teacher_auc"] < 0.9
    prepare({**cfg, "seed": 4, "out_dir": str(tmp_path / "c")}, progress=False)
    assert not read_split(tmp_path / "c", "train").equals(ta)


def test_synthetic_vocabularies_are_zipf_and_span_orders_of_magnitude():
    g = SyntheticCriteo(rows=65536, seed=0, max_vocab=1_000_000)
    assert g.vocab_sizes.min() == 10 and g.vocab_sizes.max() == 1_000_000
    _, cat, _, _ = g.chunk(0)
    big = int(np.argmax(g.vocab_sizes))
    counts = np.bincount(cat[:, big])
    assert counts[0] > 50 * np.median(counts[counts > 0])  # heavy head, long tail


def test_teacher_auc_is_the_pairwise_auc_of_the_teacher_logits():
    """The synthetic teacher's AUC comes from the project's one AUC implementation (metrics.py), which matches the
    pairwise definition, ties counted half."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(-10, 10, 300).astype(float)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pair = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert binary_metrics(torch.tensor(s), torch.tensor(y))["auc"] == pytest.approx(pair, abs=1e-6)
    g = SyntheticCriteo(rows=3000, seed=2, max_vocab=100)
    labels, _, _, logits = g.chunk(0)
    pos, neg = logits[labels == 1], logits[labels == 0]
    pair = ((pos[:, None] > neg[None, :]).mean())
    assert g.teacher_auc(3000) == pytest.approx(pair, abs=1e-5)


# Cache -----------------------------------------------------------------------------------------------------

def test_cache_reuse_and_invalidation(tmp_path):
    csv = write_csv(tmp_path / "t.csv", ["y,color,size"] + [f"yes,red,{i}" for i in range(50)])
    cfg = tabular_cfg(csv, tmp_path / "o")
    assert not prepare(cfg, progress=False).reused
    assert prepare(cfg, progress=False).reused
    assert prepare({**cfg, "batch_size": 7}, progress=False).reused  # loader settings do not invalidate
    assert prepare({**cfg, "in_memory": "device"}, progress=False).reused
    assert not prepare({**cfg, "min_count": 3}, progress=False).reused
    write_csv(csv, ["y,color,size"] + [f"no,red,{i}" for i in range(60)])
    os.utime(csv, ns=(1, 1))
    r = prepare({**cfg, "min_count": 3}, progress=False)
    assert not r.reused and sum(r.summary["rows"].values()) == 60


@pytest.mark.parametrize("held_out_files", [True, False])
def test_reusing_the_fit_pass_chunks_prepares_the_same_files_reading_each_file_once(tmp_path, monkeypatch,
                                                                                     held_out_files):
    """data.reuse_parsed_mb: the encode pass reuses the train chunks the fit pass parsed (the fit pass reads only
    the train files); too small a limit or 0 reads them again. The prepared files, row counts and bad-row counts
    are the same either way, with valid/test files and with a drawn split."""
    from lowrank_ctr.data.formats.criteo import Criteo

    train = sample("criteo_sample", "train.txt").read_text().splitlines()
    bad = "\t".join(["0"] + ["3"] * 13 + ["ab"] * 25)  # one column short
    files = {"train": write_csv(tmp_path / "train.txt", train * 3 + [bad]),
             "valid": write_csv(tmp_path / "valid.txt", sample("criteo_sample", "valid.txt").read_text().splitlines()
                                + [bad]),
             "test": sample("criteo_sample", "test.txt")}
    cfg = dict(name="c", format="criteo", train_path=str(files["train"]), min_count=2, numeric_mode="bucketize",
               on_bad_rows="skip", block_size=1 << 18)
    if held_out_files:
        cfg.update(valid_path=str(files["valid"]), test_path=str(files["test"]))
    reads: dict[str, int] = {}
    original = Criteo.read

    def counted(self, cfg, path, *args, **kwargs):
        reads[Path(path).stem] = reads.get(Path(path).stem, 0) + 1
        return original(self, cfg, path, *args, **kwargs)

    monkeypatch.setattr(Criteo, "read", counted)
    results = {}
    for limit in (256, 1, 0):  # kept; too large to keep (the train file parses to > 1 MB); never kept
        reads.clear()
        results[limit] = prepare({**cfg, "reuse_parsed_mb": limit, "out_dir": str(tmp_path / f"o{limit}")},
                                 progress=False)
        expected = {"train": 1 if limit == 256 else 2}
        if held_out_files:
            expected.update(valid=1, test=1)
        assert reads == expected, limit
    kept, again = results[256], results[0]
    assert kept.summary["bad_rows_skipped"] == again.summary["bad_rows_skipped"] == (2 if held_out_files else 1)
    assert kept.summary["rows"] == again.summary["rows"] == results[1].summary["rows"]
    assert sum(kept.summary["rows"].values()) == 3 * 7200 + (409 + 391 if held_out_files else 0)
    for part in ("train", "valid", "test", "vocab"):
        assert pq.read_table(kept.path / part).equals(pq.read_table(again.path / part)), part

    chunk = pq.read_table(kept.path / "train")  # the running limit: chunks beyond it are all dropped
    keeper = prep_mod._KeptChunks(1)
    for _ in range(1 + (1 << 20) // chunk.nbytes):
        keeper.add(chunk, 0)
    assert keeper.take() is None
    keeper = prep_mod._KeptChunks(1)
    keeper.add(chunk.slice(0, 10), 0)
    assert [t.num_rows for t, _ in keeper.take()] == [10]


def test_interrupted_preparation_leaves_no_finished_cache(tmp_path, monkeypatch):
    csv = write_csv(tmp_path / "t.csv", ["y,color,size"] + [f"yes,red,{i}" for i in range(50)])
    cfg = tabular_cfg(csv, tmp_path / "o")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep_mod, "encode_table", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.tmp-*"))
    monkeypatch.undo()
    assert not prepare(cfg, progress=False).reused


# Bad input -------------------------------------------------------------------------------------------------

CRITEO_OK = "\t".join(["1"] + ["3"] * 13 + ["ab"] * 26)


def test_wrong_column_count_names_file_and_line(tmp_path):
    bad = "\t".join(["0"] + ["3"] * 13 + ["ab"] * 25)
    f = write_csv(tmp_path / "c.txt", [CRITEO_OK, CRITEO_OK, bad, CRITEO_OK])
    cfg = dict(name="c", format="criteo", train_path=str(f), out_dir=str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"c\.txt:3: expected 40 columns, got 39.*on_bad_rows=skip"):
        prepare(cfg, progress=False)
    assert not (tmp_path / "o").exists()
    r = prepare({**cfg, "on_bad_rows": "skip"}, progress=False)
    assert r.summary["bad_rows_skipped"] == 1 and sum(r.summary["rows"].values()) == 3


def test_non_numeric_value_in_numeric_column(tmp_path):
    bad = "\t".join(["0", "3", "abc"] + ["3"] * 11 + ["ab"] * 26)
    f = write_csv(tmp_path / "c.txt", [CRITEO_OK, bad, CRITEO_OK, CRITEO_OK])
    cfg = dict(name="c", format="criteo", train_path=str(f), out_dir=str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"c\.txt:2: column 'I2' is numeric"):
        prepare(cfg, progress=False)
    r = prepare({**cfg, "on_bad_rows": "skip"}, progress=False)
    assert r.summary["bad_rows_skipped"] == 1 and sum(r.summary["rows"].values()) == 3


def test_bad_label_and_header_errors(tmp_path):
    f = write_csv(tmp_path / "c.txt", [CRITEO_OK, "\t".join(["x"] + ["3"] * 13 + ["ab"] * 26)])
    with pytest.raises(DataError, match=r"c\.txt:2: label column 'label' must be 1 \(click\) or 0 \(no click\); "
                                        r"unexpected values in the file: 'x' \(1 row\)"):
        prepare(dict(name="c", format="criteo", train_path=str(f), out_dir=str(tmp_path / "o")), progress=False)
    csv = write_csv(tmp_path / "t.csv", ["y,colour,size", "yes,red,1"])
    with pytest.raises(DataError, match=r"column\(s\) \['color'\] not found"):
        prepare(tabular_cfg(csv, tmp_path / "o2"), progress=False)


@pytest.mark.parametrize("problem", ["missing", "empty", "directory"])
def test_missing_and_empty_files(tmp_path, problem):
    p = tmp_path / "x.txt"
    if problem == "empty":
        p.write_text("")
    elif problem == "directory":
        p.mkdir()
    with pytest.raises(DataError, match={"missing": "does not exist", "empty": "is empty",
                                         "directory": "is a directory"}[problem]):
        prepare(dict(name="c", format="criteo", train_path=str(p), out_dir=str(tmp_path / "o")), progress=False)


def test_unknown_format_and_bad_settings(tmp_path):
    with pytest.raises(DataError, match="data.format='xls' is not known"):
        prepare(dict(name="c", format="xls", out_dir=str(tmp_path)), progress=False)
    with pytest.raises(DataError, match="on_bad_rows"):
        prepare(dict(name="s", format="synthetic", rows=10, on_bad_rows="ignore", out_dir=str(tmp_path / "o")),
                progress=False)
    with pytest.raises(DataError, match="data.split"):
        prepare(dict(name="s", format="synthetic", rows=10, split=[0.5, 0.6, 0.1], out_dir=str(tmp_path / "o")),
                progress=False)


# Streaming -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "s"
    # small shards and row groups so that the work split crosses piece boundaries
    r = prepare(dict(name="s", format="synthetic", rows=20_000, seed=1, max_vocab=2000, shard_rows=3000,
                     out_dir=str(out)), progress=False)
    return r


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (3, 2)])
def test_every_row_exactly_once_across_ranks_and_workers(synth, world, workers):
    rows = synth.summary["rows"]["train"]
    seen, counts = [], []
    for rank in range(world):
        ds = ShardedBatches(synth.path / "train", synth.schema, 256, shuffle=True, seed=5, shuffle_buffer=2000,
                            world=(rank, world))
        ds._num_workers = max(workers, 1)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == len(ds)
        seen.append(torch.cat([b["row_id"] for b in batches]))
    ids = torch.cat(seen)
    assert ids.numel() == rows and torch.equal(ids.sort().values, torch.arange(rows))
    assert len(set(counts)) == 1  # ranks stay in lock-step


@pytest.mark.parametrize("shuffle", [True, False])
def test_row_groups_read_in_slices_keep_every_row_once(synth, monkeypatch, shuffle):
    # slices smaller than a row group (3000 rows) and not dividing it: slice edges cross the ranks' row ranges
    monkeypatch.setattr(datamodule, "READ_ROWS", 700)
    rows = synth.summary["rows"]["train"]
    ids = []
    for rank in range(3):
        ds = ShardedBatches(synth.path / "train", synth.schema, 300, shuffle=shuffle, seed=2, shuffle_buffer=1000,
                            world=(rank, 3))
        batches = list(ds)
        assert len(batches) == len(ds) and all(len(b["label"]) <= 300 for b in batches)
        ids.append(torch.cat([b["row_id"] for b in batches]))
    ids = torch.cat(ids)
    if shuffle:
        assert not torch.equal(ids, torch.arange(rows))
        ids = ids.sort().values
    assert torch.equal(ids, torch.arange(rows))


def test_loader_holds_about_one_copy_of_its_rows(synth):
    """A shuffle buffer as large as the split holds the split once: no concatenated copy next to the parts read,
    and its ids at the 4 bytes they were prepared with, although batches carry them as int64."""
    import tracemalloc

    ds = ShardedBatches(synth.path / "train", synth.schema, 512, shuffle=True, seed=0, shuffle_buffer=1 << 20)
    first = next(iter(ds))
    assert first["cat"].dtype == first["multi"].dtype == torch.int64
    split_bytes = ds.rows * sum(v[:1].numel() * (4 if k in ("cat", "multi") else v.element_size())
                                for k, v in first.items())
    tracemalloc.start()
    try:
        for _ in ds:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.4 * split_bytes, (peak, split_bytes)


def test_shuffle_changes_with_epoch_and_eval_order_is_fixed(synth):
    tr = ShardedBatches(synth.path / "train", synth.schema, 512, shuffle=True, seed=0, shuffle_buffer=4000)
    e0 = torch.cat([b["row_id"] for b in tr])
    tr.set_epoch(1)
    e1 = torch.cat([b["row_id"] for b in tr])
    assert not torch.equal(e0, e1) and torch.equal(e0.sort().values, e1.sort().values)
    va = ShardedBatches(synth.path / "valid", synth.schema, 512)
    v0 = torch.cat([b["row_id"] for b in va])
    assert torch.equal(v0, torch.arange(len(v0)))


@pytest.mark.parametrize("world", [1, 3])
def test_a_split_held_in_memory_serves_every_row_once_per_epoch_in_lockstep(synth, world):
    """data.in_memory: a full permutation per epoch instead of a buffer, the same work split across ranks."""
    rows = synth.summary["rows"]["train"]
    epochs = []
    for epoch in (0, 1):
        ids, counts = [], []
        for rank in range(world):
            held = InMemoryBatches(ShardedBatches(synth.path / "train", synth.schema, 256, shuffle=True, seed=5,
                                                  world=(rank, world)))
            held.set_epoch(epoch)
            batches = list(held)
            assert len(batches) == len(held) and all(len(b["label"]) <= 256 for b in batches)
            counts.append(len(batches))
            ids.append(torch.cat([b["row_id"] for b in batches]))
        assert len(set(counts)) == 1  # ranks stay in lock-step
        epochs.append(torch.cat(ids))
        assert torch.equal(epochs[-1].sort().values, torch.arange(rows))
    assert not torch.equal(epochs[0], epochs[1])  # a new order every epoch
    again = InMemoryBatches(ShardedBatches(synth.path / "train", synth.schema, 256, shuffle=True, seed=5,
                                           world=(0, world)))
    assert torch.equal(torch.cat([b["row_id"] for b in again]), epochs[0][:len(torch.cat(ids[:1]))])


def test_loading_a_split_into_memory_decodes_one_slice_at_a_time(synth):
    """The tensors are filled slice by slice: no list of decoded parts nor a concatenated copy beside them (numpy's
    allocations are traced; the torch tensors the split ends up in are not)."""
    import tracemalloc

    source = ShardedBatches(synth.path / "train", synth.schema, 512)
    tracemalloc.start()
    try:
        held = InMemoryBatches(source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    split_bytes = sum(t.numel() * t.element_size() for t in held.tensors.values())
    assert peak < 0.5 * split_bytes, (peak, split_bytes)


def test_an_evaluation_split_held_in_memory_gives_the_streamed_batches(synth):
    """Same batches, same dtypes (int64 ids), although the split is held with its ids at 4 bytes."""
    streamed = list(ShardedBatches(synth.path / "valid", synth.schema, 700))
    source = InMemoryBatches(ShardedBatches(synth.path / "valid", synth.schema, 700))
    assert source.tensors["cat"].element_size() == source.tensors["multi"].element_size() == 4
    held = list(source)
    assert len(held) == len(streamed)
    for a, b in zip(held, streamed):
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert held[0]["cat"].dtype == held[0]["multi"].dtype == torch.int64


def test_datamodule_in_memory_serves_once_and_refuses_what_does_not_fit(tmp_path, monkeypatch):
    cfg = dict(name="s", format="synthetic", rows=5000, max_vocab=500, batch_size=1000, eval_batch_size=2000,
               out_dir=str(tmp_path / "s"), in_memory="host")
    dm = CTRDataModule(cfg, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    assert sum(len(b["label"]) for b in dm.train_dataloader()) == dm.prepared.summary["rows"]["train"]
    assert dm.train_dataloader().dataset is dm.in_memory["train"]  # loaded once, reused by later loaders
    on_device = CTRDataModule(dict(cfg, in_memory="device"), progress=False)
    on_device.device = torch.device("meta")  # what the pipeline sets (its compute device), before any trainer
    on_device.setup("fit")
    assert on_device.val_dataloader().dataset.tensors["label"].device.type == "meta"
    small = CTRDataModule(dict(cfg, out_dir=str(tmp_path / "s")), progress=False)
    small.setup("fit")
    monkeypatch.setattr(datamodule, "available_bytes", lambda device: 1000)
    with pytest.raises(DataError, match=r"data.in_memory=host: the test split \([0-9,]+ rows\) needs .* GiB free on "
                                         r"cpu: set data.in_memory=false"):
        small.test_dataloader()


def test_batches_carry_typed_tensors(synth):
    b = next(iter(ShardedBatches(synth.path / "valid", synth.schema, 64)))
    assert b["cat"].dtype == torch.int64 and b["cat"].shape == (64, 26)
    assert b["num"].dtype == torch.float32 and b["num"].shape == (64, 13)
    assert b["label"].dtype == torch.float32 and set(b["label"].unique().tolist()) <= {0.0, 1.0}
    assert b["multi"].shape == (64, 0, 1)
    for j, f in enumerate(synth.schema.categorical):
        assert int(b["cat"][:, j].max()) < f.vocab_size


def test_batch_sizes_cover_rows():
    for rows, k, bs in [(10, 3, 4), (9, 3, 3), (5, 5, 10), (1000, 4, 256)]:
        s = batch_sizes(rows, k, bs)
        assert len(s) == k and sum(s) == rows and max(s) <= bs and min(s) >= 1


def test_datamodule_prepares_and_serves(tmp_path):
    dm = CTRDataModule(dict(name="s", format="synthetic", rows=5000, max_vocab=500, batch_size=1000,
                            eval_batch_size=2000, out_dir=str(tmp_path / "s")), progress=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.schema.num_fields == 39
    assert sum(len(b["label"]) for b in dm.train_dataloader()) == dm.prepared.summary["rows"]["train"]
    assert sum(len(b["label"]) for b in dm.test_dataloader()) == dm.prepared.summary["rows"]["test"]


def test_prepare_cli_writes_schema_and_summary(tmp_path):
    from helpers import run_cli

    out = tmp_path / "prepared"
    r = run_cli(["lowrank-ctr-prepare", "data=synthetic", "data.rows=3000", "data.max_vocab=100",
                 f"data.out_dir={out}", f"hydra.run.dir={tmp_path / 'log'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["rows"].values()) == 3000 and summary["bad_rows_skipped"] == 0
    assert Schema.load(out).num_fields == 39
    bad = run_cli(["lowrank-ctr-prepare", "data=criteo", "data.train_path=/no/such/file", f"data.out_dir={out}2",
                   f"hydra.run.dir={tmp_path / 'log2'}"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: data file /no/such/file")
