"""MovieLens ratings joined with its users and items tables; label = rating >= ``positive_rating``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lowrank_ctr.data.errors import DataError, check_input_file
from lowrank_ctr.data.formats import register
from lowrank_ctr.data.formats.base import Config, DatasetFormat, number, text
from lowrank_ctr.data.readers import BadRows, RawColumns

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
RATING_RANGE = (0.5, 5.0)  # stars; MovieLens 100K uses 1..5, later releases half stars
RATINGS_COLUMNS = ["user_id", "movie_id", "rating", "timestamp"]


def _beside(ratings: Path, cfg: Config, key: str, default: str) -> Path:
    return Path(cfg.get(key) or ratings.with_name(default)).expanduser()


@register
class MovieLens(DatasetFormat):
    name = "movielens"
    description = "MovieLens ratings.parquet + users.parquet + items.parquet (label: rating >= positive_rating)"
    keys = {
        "users_path": text(optional=True),
        "items_path": text(optional=True),
        "positive_rating": number(*RATING_RANGE),
    }
    cannot_predict = ("its rows are ratings joined with the users and items tables during preparation, and a row "
                      "of an unknown user or item is dropped, so one raw file cannot be scored row by row. Score the "
                      "prepared test split instead (lowrank-ctr-compress / the run's test metrics), or write the "
                      "joined rows to a CSV and train with data=tabular")

    def input_paths(self, cfg: Config) -> list[str]:
        ratings = super().input_paths(cfg)
        tables = [str(_beside(Path(r), cfg, key, default)) for r in ratings
                  for key, default in (("users_path", "users.parquet"), ("items_path", "items.parquet"))]
        return ratings + list(dict.fromkeys(tables))

    def raw_columns(self, cfg: Config) -> RawColumns:
        return RawColumns(categorical=["user", "item", "age", "gender", "occupation", "zip_prefix", "hour", "weekday"],
                          multihot=["genres"])

    def read(self, cfg: Config, path: str | Path, bad_rows: BadRows, *, label_optional: bool = False,
             batch_rows: int = 1 << 18) -> Iterator[pa.Table]:
        """Ratings stream in batches; the user and item tables are small and joined per batch. A rating of an
        unknown user or item, or outside 0.5-5 stars, is a bad row."""
        ratings = check_input_file(path, "ratings file")
        users = check_input_file(_beside(ratings, cfg, "users_path", "users.parquet"), "users file")
        items = check_input_file(_beside(ratings, cfg, "items_path", "items.parquet"), "items file")
        positive_rating = float(cfg.get("positive_rating", 4))
        return self._chunks(ratings, users, items, positive_rating, bad_rows, batch_rows)

    def _chunks(self, ratings: Path, users: Path, items: Path, positive_rating: float, bad_rows: BadRows,
                batch_rows: int) -> Iterator[pa.Table]:
        u = pq.read_table(users).to_pandas().set_index("user_id")
        it = pq.read_table(items).to_pandas().set_index("movie_id")
        genre_cols = [g for g in GENRES if g in it.columns]
        flags = it[genre_cols].to_numpy(dtype=bool)
        genre_lists = pd.Series([[g for g, f in zip(genre_cols, row) if f] for row in flags], index=it.index,
                                dtype=object)
        pf = pq.ParquetFile(ratings)
        missing = [c for c in RATINGS_COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{ratings}: column(s) {missing} not found (has {pf.schema_arrow.names}); "
                            f"a MovieLens ratings file needs {', '.join(RATINGS_COLUMNS)}")
        line = 1
        for batch in pf.iter_batches(batch_size=batch_rows, columns=RATINGS_COLUMNS):
            df = batch.to_pandas()
            unknown = (~df["user_id"].isin(u.index) | ~df["movie_id"].isin(it.index)).to_numpy()
            out_of_range = (~df["rating"].between(*RATING_RANGE)).to_numpy()  # NaN included
            for mask, problem in ((unknown, "rating refers to a user or item missing from the users/items tables"),
                                  (out_of_range & ~unknown, f"rating is not {RATING_RANGE[0]}-{RATING_RANGE[1]:g} "
                                                           "stars (or is empty)")):
                for i in np.flatnonzero(mask)[:1]:
                    bad_rows.found(ratings, line + int(i), problem, count=0)  # raises unless on_bad_rows=skip
            drop = unknown | out_of_range
            bad_rows.skipped += int(drop.sum())
            df = df[~drop]
            line += batch.num_rows
            ts = df["timestamp"].astype("int64").to_numpy().astype("datetime64[s]")
            user = u.loc[df["user_id"].to_numpy()]
            yield pa.table({
                "label": pa.array((df["rating"].to_numpy() >= positive_rating).astype(np.int8)),
                "user": pa.array(df["user_id"].astype(str).to_numpy()),
                "item": pa.array(df["movie_id"].astype(str).to_numpy()),
                "age": pa.array(user["age"].astype(str).to_numpy()),
                "gender": pa.array(user["gender"].astype(str).to_numpy()),
                "occupation": pa.array(user["occupation"].astype(str).to_numpy()),
                "zip_prefix": pa.array(user["zip_code"].astype(str).str[:2].to_numpy()),
                "hour": pa.array((ts.astype("datetime64[h]").astype(np.int64) % 24).astype(str)),
                "weekday": pa.array(((ts.astype("datetime64[D]").astype(np.int64) + 3) % 7).astype(str)),
                "genres": pa.array(genre_lists.loc[df["movie_id"].to_numpy()].tolist(), pa.list_(pa.string())),
            })

    def example(self, directory: Path) -> dict:
        users = pd.DataFrame({"user_id": [1, 2, 3], "age": [24, 53, 33], "gender": ["M", "F", "M"],
                              "occupation": ["technician", "other", "writer"], "zip_code": ["85711", "94043", "32067"]})
        items = pd.DataFrame({"movie_id": [10, 20], **{g: [g == "Comedy", g in ("Action", "Drama")] for g in GENRES}})
        ratings = pd.DataFrame({"user_id": [1, 2, 3, 1, 2, 3] * 4, "movie_id": [10, 20] * 12,
                                "rating": [5, 3, 4, 1, 2, 4] * 4, "timestamp": 874965758 + np.arange(24) * 3600})
        users.to_parquet(directory / "users.parquet")
        items.to_parquet(directory / "items.parquet")
        ratings.to_parquet(directory / "ratings.parquet")
        return {"name": "movielens_example", "format": self.name, "train_path": str(directory / "ratings.parquet"),
                "positive_rating": 4, "min_count": 1, "split": [1.0, 0.0, 0.0], "out_dir": str(directory / "prepared")}
