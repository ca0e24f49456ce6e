"""Criteo-shaped synthetic data at any size, deterministic by seed: the embedded default dataset.

Shape: 13 heavy-tailed count features (with missing values) and 26 categorical fields whose vocabularies span
``min_vocab``..``max_vocab`` with Zipf-like frequencies, like Criteo's.

Labels come from a hidden teacher CTR model: first-order weights per value, FM-style pairwise interactions of
field embeddings that have a chosen low rank (``teacher_rank``; each field's table is A_i B_i with A_i: V_i x r),
numeric effects and Gaussian noise; the bias is set so the positive rate is ``positive_rate``. So a good model
reaches a known AUC (``teacher_auc()``) and low-rank structure is really there for compression to find.

Nothing is stored: per-value teacher parameters are hashes of (seed, field, value), and rows are generated
chunk by chunk from (seed, chunk index) -- two passes over the data regenerate identical rows in bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from lowrank_ctr.data.readers import RawColumns

GEN_CHUNK = 65536
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _hash_uniform(keys: np.ndarray, width: int) -> np.ndarray:
    """(n,) uint64 keys -> (n, width) values, uniform with mean 0 and variance 1."""
    with np.errstate(over="ignore"):
        k = splitmix64(keys.astype(np.uint64))[:, None] * np.uint64(width + 1) + np.arange(1, width + 1,
                                                                                            dtype=np.uint64)
    u = (splitmix64(k) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return (u - 0.5) * np.sqrt(12.0)


@dataclass
class SyntheticCriteo:
    rows: int = 200_000
    seed: int = 0
    n_numeric: int = 13
    n_categorical: int = 26
    min_vocab: int = 10
    max_vocab: int = 1_000_000
    zipf_min: float = 1.05
    zipf_max: float = 1.4
    teacher_rank: int = 4
    teacher_dim: int = 16
    positive_rate: float = 0.25
    first_order_scale: float = 0.6
    interaction_scale: float = 1.0
    numeric_scale: float = 0.4
    noise: float = 0.5

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise ValueError(f"data.rows must be >= 1, got {self.rows}")
        if not (2 <= self.min_vocab <= self.max_vocab):
            raise ValueError(f"need 2 <= data.min_vocab <= data.max_vocab, got {self.min_vocab}, {self.max_vocab}")
        if not 0.0 < self.positive_rate < 1.0:
            raise ValueError(f"data.positive_rate must be in (0, 1), got {self.positive_rate}")
        rng = np.random.default_rng([self.seed, 7])
        self.vocab_sizes = np.geomspace(self.min_vocab, self.max_vocab, self.n_categorical).round().astype(np.int64)
        rng.shuffle(self.vocab_sizes)
        self.zipf_a = rng.uniform(self.zipf_min, self.zipf_max, self.n_categorical)
        self._cdfs = []
        for v, a in zip(self.vocab_sizes, self.zipf_a):
            p = 1.0 / np.arange(1, v + 1, dtype=np.float64) ** a
            self._cdfs.append(np.cumsum(p / p.sum()))
        # Shared low-rank factor per field: e_i(v) = A_i(v) @ B_i, A_i(v) hashed, B_i: r x d.
        self._b = rng.normal(size=(self.n_categorical, self.teacher_rank, self.teacher_dim))
        self._b /= np.sqrt(self.teacher_rank * self.teacher_dim)
        self._num_mu = rng.uniform(0.0, 3.0, self.n_numeric)
        self._num_sigma = rng.uniform(0.5, 1.5, self.n_numeric)
        self._num_missing = rng.uniform(0.0, 0.4, self.n_numeric)
        self._num_coef = rng.normal(size=self.n_numeric)
        self._norm = (0.0, 1.0, 0.0, 1.0, 0.0, 1.0)
        first, inter, numeric = self._components(*self._features(np.random.default_rng([self.seed, 11]), 20_000))
        self._norm = (first.mean(), first.std() + 1e-12, inter.mean(), inter.std() + 1e-12,
                      numeric.mean(), numeric.std() + 1e-12)
        self._bias = 0.0
        logits = self._logits(first, inter, numeric)
        lo, hi = -20.0, 20.0  # bisection on the bias for the requested positive rate (noise included)
        noise = np.random.default_rng([self.seed, 13]).normal(0.0, self.noise, logits.shape)
        for _ in range(60):
            mid = (lo + hi) / 2
            rate = (1.0 / (1.0 + np.exp(-(logits + noise + mid)))).mean()
            lo, hi = (mid, hi) if rate < self.positive_rate else (lo, mid)
        self._bias = (lo + hi) / 2

    # Columns -----------------------------------------------------------------------------------------------
    @property
    def raw_columns(self) -> RawColumns:
        """Criteo's column names: I1..In numeric, C1..Cm categorical."""
        return RawColumns(categorical=[f"C{i}" for i in range(1, self.n_categorical + 1)],
                          numeric=[f"I{i}" for i in range(1, self.n_numeric + 1)])

    # Generation ---------------------------------------------------------------------------------------------
    def _features(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        cat = np.empty((n, self.n_categorical), dtype=np.int64)
        for i, cdf in enumerate(self._cdfs):
            cat[:, i] = np.minimum(np.searchsorted(cdf, rng.random(n)), len(cdf) - 1)
        counts = np.floor(np.exp(rng.normal(self._num_mu, self._num_sigma, (n, self.n_numeric)))) - 1.0
        counts[rng.random((n, self.n_numeric)) < self._num_missing] = np.nan
        return cat, counts

    def _components(self, cat: np.ndarray, num: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, f = cat.shape
        keys = (np.uint64(self.seed) << np.uint64(40)) ^ (np.arange(f, dtype=np.uint64)[None, :] << np.uint64(32))
        keys = (keys ^ cat.astype(np.uint64)).reshape(-1)
        codes = _hash_uniform(keys, self.teacher_rank + 1).reshape(n, f, self.teacher_rank + 1)
        first = codes[..., 0].sum(1) / np.sqrt(f)
        emb = np.einsum("nfr,frd->nfd", codes[..., 1:], self._b)
        inter = 0.5 * ((emb.sum(1) ** 2).sum(1) - (emb**2).sum((1, 2)))
        x = np.log1p(np.maximum(np.nan_to_num(num, nan=0.0), 0.0))
        numeric = ((x - self._num_mu) / self._num_sigma) @ self._num_coef / np.sqrt(self.n_numeric)
        return first, inter, numeric

    def _logits(self, first: np.ndarray, inter: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        m1, s1, m2, s2, m3, s3 = self._norm
        return (self._bias + self.first_order_scale * (first - m1) / s1 + self.interaction_scale * (inter - m2) / s2
                + self.numeric_scale * (numeric - m3) / s3)

    def chunk(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows [k*GEN_CHUNK, ...) as (labels, categorical values, numeric values, teacher logits)."""
        n = min(GEN_CHUNK, self.rows - k * GEN_CHUNK)
        rng = np.random.default_rng([self.seed, 1, k])
        cat, num = self._features(rng, n)
        logits = self._logits(*self._components(cat, num)) + rng.normal(0.0, self.noise, n)
        labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int8)
        return labels, cat, num, logits

    @property
    def num_chunks(self) -> int:
        return -(-self.rows // GEN_CHUNK)

    def tables(self) -> Iterator[pa.Table]:
        """Standard reader chunks (see readers.py): label, numeric float64 with nulls, categorical int64."""
        raw = self.raw_columns
        for k in range(self.num_chunks):
            labels, cat, num, _ = self.chunk(k)
            cols = {"label": pa.array(labels)}
            for j, name in enumerate(raw.numeric):
                cols[name] = pa.array(num[:, j], mask=np.isnan(num[:, j]))
            for j, name in enumerate(raw.categorical):
                cols[name] = pa.array(cat[:, j])
            yield pa.table(cols)

    def teacher_auc(self, n: int = 200_000) -> float | None:
        """AUC of the teacher's own logits on the first ``n`` rows: roughly the best any model can reach (None when
        those rows hold one class)."""
        import torch

        from lowrank_ctr.metrics import binary_metrics  # the project's one AUC implementation

        labels, logits = [], []
        for k in range(min(self.num_chunks, -(-n // GEN_CHUNK))):
            y, _, _, z = self.chunk(k)
            labels.append(y)
            logits.append(z)
        return binary_metrics(torch.from_numpy(np.concatenate(logits)), torch.from_numpy(np.concatenate(labels)),
                              "the synthetic teacher's rows")["auc"]

    def write_criteo_tsv(self, path: str | Path, raw_ids: bool = False, label: bool = True,
                         select: Callable[[int], np.ndarray] | None = None) -> Path:
        """The same rows in the raw Criteo TSV format.

        By default categorical values are hashed to Criteo-like strings (for preparing them as ``data=criteo`` and
        benchmarking the real reader). ``raw_ids=True`` writes the generator's own integer category ids, the values
        a ``data=synthetic`` model was trained on, so ``lowrank-ctr-predict`` can score them; ``label=False`` leaves
        out the label column (serving rows). ``select(n)`` gives a keep-mask for the next ``n`` rows (e.g. one split
        of the prepared dataset); None writes every row."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = self.raw_columns
        opts = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
        schema = self._tsv_schema(label)
        with pacsv.CSVWriter(path, schema, write_options=opts) as writer:
            for k in range(self.num_chunks):
                labels, cat, num, _ = self.chunk(k)
                if select is not None:
                    keep = select(len(labels))
                    labels, cat, num = labels[keep], cat[keep], num[keep]
                cols = {"label": pa.array(labels.astype(np.int64))} if label else {}
                for j, name in enumerate(raw.numeric):
                    cols[name] = pa.array(num[:, j], mask=np.isnan(num[:, j])).cast(pa.int64())
                values = cat if raw_ids else (splitmix64(cat.astype(np.uint64) + (
                    np.arange(cat.shape[1], dtype=np.uint64) << 40)) >> np.uint64(32)).astype(np.int64)
                for j, name in enumerate(raw.categorical):
                    cols[name] = pa.array(values[:, j]).cast(pa.string())
                writer.write_table(pa.table(cols, schema=schema))
        return path

    def _tsv_schema(self, label: bool = True) -> pa.Schema:
        raw = self.raw_columns
        return pa.schema(([("label", pa.int64())] if label else []) + [(n, pa.int64()) for n in raw.numeric]
                         + [(n, pa.string()) for n in raw.categorical])

