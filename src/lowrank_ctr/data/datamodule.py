"""Streaming batches from prepared parquet shards, and the LightningDataModule around them.

No per-row ``__getitem__``: a consumer (one loader worker of one DDP rank) reads whole parquet row groups,
optionally shuffles them in a buffer, and cuts whole batches out of numpy arrays.

Work split, exactly once per epoch: the (shuffled) sequence of row groups is one long row range, and consumer c of
C = world_size x num_workers takes the contiguous slice [c N / C, (c+1) N / C). Every consumer then yields the SAME
number of batches K (a consumer with fewer rows cuts a few smaller batches), so DDP ranks stay in lock-step and
no rank waits on an all-reduce the others never join.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lowrank_ctr.data.batch import ID_KEYS, batch_arrays
from lowrank_ctr.data.errors import DataError
from lowrank_ctr.data.formats.base import IN_MEMORY
from lowrank_ctr.data.schema import Schema

log = logging.getLogger(__name__)
# Our IterableDataset splits work across workers itself, so its __len__ is exact; Lightning cannot know that.
warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")


@dataclass(frozen=True)
class Piece:
    """One parquet row group: the unit of reading and of shuffling order."""

    path: str
    row_group: int
    rows: int


def list_pieces(split_dir: Path) -> list[Piece]:
    files = sorted(Path(split_dir).glob("part-*.parquet"))
    pieces = []
    for f in files:
        md = pq.ParquetFile(f).metadata
        pieces += [Piece(str(f), i, md.row_group(i).num_rows) for i in range(md.num_row_groups)]
    return [p for p in pieces if p.rows > 0]


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def batch_sizes(rows: int, num_batches: int, batch_size: int) -> list[int]:
    """``rows`` cut into exactly ``num_batches`` batches of at most ``batch_size``, full ones first."""
    sizes, left = [], rows
    for i in range(num_batches):
        size = min(batch_size, left - (num_batches - 1 - i))
        sizes.append(size)
        left -= size
    return sizes


class ShardedBatches(IterableDataset):
    """Whole batches from one split's shards; see the module docstring for the work split."""

    def __init__(self, split_dir: str | Path, schema: Schema, batch_size: int, shuffle: bool = False, seed: int = 0,
                 shuffle_buffer: int = 262_144, world: tuple[int, int] | None = None, loader_workers: int = 1) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        self.split_dir = Path(split_dir)
        self.schema = schema
        self.pieces = list_pieces(self.split_dir)
        self.rows = sum(p.rows for p in self.pieces)
        self.batch_size, self.shuffle, self.seed = int(batch_size), shuffle, int(seed)
        self.shuffle_buffer = max(int(shuffle_buffer), 2 * self.batch_size)  # keeps half for mixing
        self.epoch = 0
        self._world = world  # (rank, world_size) override for tests; default: torch.distributed
        self._num_workers = max(int(loader_workers), 1)  # the DataLoader's worker count: __len__ counts their batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # Work split -------------------------------------------------------------------------------------------
    def _consumer(self) -> tuple[int, int]:
        rank, world = self._world or _distributed()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def batches_per_consumer(self, consumers: int) -> int:
        most_rows = -(-self.rows // consumers)
        return -(-most_rows // self.batch_size)

    def __len__(self) -> int:
        """Batches per DDP rank (what Lightning counts), over all loader workers."""
        _, world = self._world or _distributed()
        consumers = world * self._num_workers
        per = self.batches_per_consumer(consumers)
        return self._num_workers * min(per, max(self.rows // consumers, 1))

    def _ordered_pieces(self) -> list[Piece]:
        if not self.shuffle:
            return self.pieces
        order = np.random.default_rng([self.seed, self.epoch, 17]).permutation(len(self.pieces))
        return [self.pieces[i] for i in order]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        c, consumers = self._consumer()
        start, stop = c * self.rows // consumers, (c + 1) * self.rows // consumers
        mine = stop - start
        k = min(self.batches_per_consumer(consumers), mine)
        sizes = batch_sizes(mine, k, self.batch_size) if mine else []
        rng = np.random.default_rng([self.seed, self.epoch, 31, c])
        yield from self._batches(self._read_range(start, stop), sizes, rng)

    # Reading ----------------------------------------------------------------------------------------------
    def _read_range(self, start: int, stop: int) -> Iterator[dict[str, np.ndarray]]:
        """Rows [start, stop) of the (ordered) row groups as batch arrays of at most READ_ROWS rows each.

        A row group is decoded in slices, so pyarrow's memory (which its pool keeps for reuse) stays one slice,
        whatever the size of the row groups."""
        pos = 0
        files: dict[str, pq.ParquetFile] = {}
        for piece in self._ordered_pieces():
            lo, hi = pos, pos + piece.rows
            pos = hi
            if hi <= start or lo >= stop:
                continue
            a, b = max(start - lo, 0), min(stop, hi) - lo  # rows of this piece that are ours
            pf = files.get(piece.path) or files.setdefault(piece.path, pq.ParquetFile(piece.path))
            at = 0
            for record_batch in pf.iter_batches(batch_size=READ_ROWS, row_groups=[piece.row_group]):
                first, last = max(a - at, 0), min(b - at, record_batch.num_rows)
                at += record_batch.num_rows
                if first < last:
                    yield self._arrays(pa.Table.from_batches([record_batch.slice(first, last - first)]))
                if at >= b:
                    break

    def _arrays(self, table) -> dict[str, np.ndarray]:
        return batch_arrays(self.schema, table, id_dtype=np.int32)  # widened to int64 batch by batch (_RowBuffer)

    def _batches(self, parts: Iterator[dict[str, np.ndarray]], sizes: list[int],
                 rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
        """Cut ``sizes`` batches from the row stream; shuffled batches gather random rows of a buffer.

        The buffer is one set of arrays filled in place (no concatenation of parts, no copy of the rows kept for
        mixing beyond the half that stays), so the loader holds about one buffer of rows, not three."""
        target = max(self.shuffle_buffer, self.batch_size) if self.shuffle else self.batch_size
        buffer = _RowBuffer(min(sum(sizes), target + READ_ROWS))
        i = 0
        exhausted = False
        while i < len(sizes):
            while not exhausted and buffer.rows < max(self.shuffle_buffer if self.shuffle else 0, sizes[i]):
                part = next(parts, None)
                if part is None:
                    exhausted = True
                    break
                buffer.append(part)
                del part  # not alive while the next part is read
            order = rng.permutation(buffer.rows) if self.shuffle else None
            # Emit as many batches as the buffer holds while keeping it at least half full for mixing.
            offset = 0
            keep = self.shuffle_buffer // 2 if (self.shuffle and not exhausted) else 0
            while i < len(sizes) and buffer.rows - offset - sizes[i] >= keep and offset + sizes[i] <= buffer.rows:
                rows = slice(offset, offset + sizes[i]) if order is None else order[offset: offset + sizes[i]]
                yield buffer.take(rows)
                offset += sizes[i]
                i += 1
            if exhausted and offset == 0 and i < len(sizes):
                raise RuntimeError(f"internal: {len(sizes) - i} batches planned but no rows left")
            buffer.keep(slice(offset, None) if order is None else order[offset:])


READ_ROWS = 8192  # rows decoded from parquet at a time: pyarrow's pool then holds ~10 MB, not a row group


class _RowBuffer:
    """Rows waiting to be batched: preallocated arrays of ``capacity`` rows, filled and compacted in place."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(int(capacity), 1)
        self.arrays: dict[str, np.ndarray] = {}
        self.rows = 0

    def append(self, part: dict[str, np.ndarray]) -> None:
        n = len(part["label"])
        if not self.arrays:
            self.arrays = {k: np.empty((self.capacity, *v.shape[1:]), v.dtype) for k, v in part.items()}
        if self.rows + n > self.capacity:  # capacity is the fill target + one read (READ_ROWS)
            raise RuntimeError(f"internal: {n} rows do not fit the buffer ({self.rows} of {self.capacity} used)")
        for k, v in part.items():
            self.arrays[k][self.rows: self.rows + n] = v
        self.rows += n

    def take(self, rows: slice | np.ndarray) -> dict[str, torch.Tensor]:
        """A batch of the buffer's ``rows``, copied (the buffer is refilled while the batch is still in use), its ids
        widened to int64: the buffer holds them as prepared, int32 (up to ``shuffle_buffer`` + READ_ROWS rows: for
        39 fields 42 MB instead of 84)."""
        batch = {}
        for k, v in self.arrays.items():
            part = v[rows]  # a view for a slice, a copy for an index array
            if k in ID_KEYS and part.dtype != np.int64:
                part = part.astype(np.int64)
            elif isinstance(rows, slice):
                part = part.copy()
            batch[k] = torch.from_numpy(part)
        return batch

    def keep(self, rows: slice | np.ndarray) -> None:
        """Keep only ``rows`` (in this order), moved to the front."""
        if isinstance(rows, slice):  # of the filled rows, not of the capacity
            rows = slice(*rows.indices(self.rows))
            n = len(range(rows.start, rows.stop, rows.step))
        else:
            n = len(rows)
        for v in self.arrays.values():
            v[:n] = v[rows]  # numpy copies through a temporary where source and destination overlap
        self.rows = n


MEMORY_HEADROOM = 0.8  # share of the free memory a split held in memory may take


def available_bytes(device: torch.device) -> int:
    """Free memory where a split would be held: a GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: the page count of the whole machine
        import os

        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class InMemoryBatches(IterableDataset):
    """One split held whole as tensors (host RAM, or a GPU's memory): batches are slices of it (evaluation) or
    gathers of a fresh random permutation of all its rows every epoch (training: a full shuffle, no buffer).

    The work split is ShardedBatches's with one consumer per DDP rank: rank r of W takes rows [r N / W, (r+1) N / W)
    of the epoch's order and every rank yields the same number of batches. Each rank holds the whole split (the
    permutation mixes all rows). What a plain GPU loop does; with data on the GPU a step copies nothing from the host.
    Ids are held as prepared, int32 (half the memory of int64), and batches carry them as int64.
    """

    def __init__(self, source: ShardedBatches, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.source = source  # its metadata: batch size, shuffle, seed, work split (its rows are read once, below)
        self.epoch, self.rows = source.epoch, source.rows
        self.device = torch.device(device)
        # filled slice by slice: the host holds one decoded slice at a time besides the tensors themselves
        self.tensors: dict[str, torch.Tensor] = {}
        at = 0
        for part in source._read_range(0, source.rows):
            n = len(part["label"])
            if not self.tensors:
                self.tensors = {k: torch.empty((self.rows, *v.shape[1:]), dtype=torch.from_numpy(v[:0]).dtype,
                                               device=self.device) for k, v in part.items()}
            for k, v in part.items():
                self.tensors[k][at: at + n].copy_(torch.from_numpy(v))
            at += n
        if at != self.rows:
            raise DataError(f"{source.split_dir}: read {at} rows, its metadata says {self.rows}; prepare it again")

    @staticmethod
    def bytes_needed(source: ShardedBatches) -> int:
        """The split's bytes as tensors, from its first rows (what loading it would take)."""
        first = next(source._read_range(0, min(source.rows, READ_ROWS)), None)
        if first is None:
            return 0
        return int(sum(v.nbytes for v in first.values()) / len(first["label"]) * source.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        _, world = self.source._world or _distributed()
        return min(self.source.batches_per_consumer(world), max(self.rows // world, 1))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, world = self.source._world or _distributed()
        start, stop = rank * self.rows // world, (rank + 1) * self.rows // world
        mine = stop - start
        count = min(self.source.batches_per_consumer(world), mine)  # one consumer per rank: no loader workers
        rows = None
        if self.source.shuffle:
            order = np.random.default_rng([self.source.seed, self.epoch, 53]).permutation(self.rows)
            rows = torch.from_numpy(order[start:stop]).to(self.device)
        offset = 0
        for size in batch_sizes(mine, count, self.source.batch_size) if mine else []:
            if rows is None:
                batch = {k: v[start + offset: start + offset + size] for k, v in self.tensors.items()}
            else:
                index = rows[offset: offset + size]
                batch = {k: v.index_select(0, index) for k, v in self.tensors.items()}
            yield {k: v.long() if k in ID_KEYS else v for k, v in batch.items()}  # ids held as prepared (int32)
            offset += size


class CTRDataModule(pl.LightningDataModule):
    """Prepares (or reuses) a dataset from its data config and serves streaming train/valid/test loaders."""

    def __init__(self, data: Mapping[str, Any], seed: int = 0, progress: bool = True) -> None:
        super().__init__()
        self.cfg = OmegaConf.to_container(data, resolve=True) if OmegaConf.is_config(data) else dict(data)
        self.seed = seed
        self.progress = progress
        self.prepared = None
        self.datasets: dict[str, ShardedBatches] = {}
        self.in_memory: dict[str, InMemoryBatches] = {}  # data.in_memory: each split loaded once, on first use
        self.device: torch.device | None = None  # data.in_memory=device: where (None: the attached trainer's)

    @property
    def path(self) -> Path:
        return Path(self.cfg["out_dir"]).expanduser()

    def prepare_data(self) -> None:
        from lowrank_ctr.data.prepare import prepare

        if self.prepared is None:  # Lightning calls this again in fit(); once per module is enough
            self.prepared = prepare(self.cfg, progress=self.progress)

    @property
    def schema(self) -> Schema:
        return Schema.load(self.path)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        schema = self.schema
        bs = int(self.cfg.get("batch_size", 4096))
        ebs = int(self.cfg.get("eval_batch_size") or bs)
        for split, size, shuffle in (("train", bs, True), ("valid", ebs, False), ("test", ebs, False)):
            self.datasets[split] = ShardedBatches(self.path / split, schema, size, shuffle=shuffle, seed=self.seed,
                                                  shuffle_buffer=int(self.cfg.get("shuffle_buffer", 262_144)),
                                                  loader_workers=int(self.cfg.get("num_workers", 0)))

    def _loader(self, split: str) -> DataLoader:
        ds = self.datasets[split]
        if ds.rows == 0:
            raise DataError(f"the {split} split of {self.path} has no rows: adjust data.split or the {split} file")
        mode = self.cfg.get("in_memory", False)
        if mode:
            # tensors already where the batches go: no workers, nothing to pin
            return DataLoader(self._held(split, mode), batch_size=None, num_workers=0)
        workers = int(self.cfg.get("num_workers", 0))
        return DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=bool(self.cfg.get("pin_memory", False)),
                          persistent_workers=False)

    def _held(self, split: str, mode: str) -> InMemoryBatches:
        """The split as tensors on the host or the trainer's device, loaded once (with a clear error when it would
        not fit in the free memory there)."""
        if split not in self.in_memory:
            if mode not in IN_MEMORY:
                raise DataError(f"data.in_memory={mode!r} must be one of false, host, device")
            trainer = getattr(self, "trainer", None)
            device = torch.device("cpu")
            if mode == "device":
                device = self.device or (trainer.strategy.root_device if trainer is not None else device)
            ds = self.datasets[split]
            need, free = InMemoryBatches.bytes_needed(ds), available_bytes(device)
            if need > MEMORY_HEADROOM * free:
                raise DataError(f"data.in_memory={mode}: the {split} split ({ds.rows:,} rows) needs {need / 2**30:.2f} "
                                f"GiB, more than {MEMORY_HEADROOM:.0%} of the {free / 2**30:.2f} GiB free on {device}: "
                                "set data.in_memory=false to stream it from disk"
                                + (", or data.in_memory=host" if device.type != "cpu" else ""))
            self.in_memory[split] = InMemoryBatches(ds, device)
            log.info("data.in_memory=%s: %s split, %s rows, %.2f GiB on %s", mode, split, f"{ds.rows:,}",
                     need / 2**30, device)
        return self.in_memory[split]  # its epoch is set by the DatasetEpoch callback, as a streaming split's

    def train_dataloader(self) -> DataLoader:
        # The shuffle epoch is advanced by the DatasetEpoch callback (workers copy the dataset each epoch).
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
