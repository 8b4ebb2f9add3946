"""The pointwise task's prepared data: rating rows with features, encoded once, written as Parquet for Ray Data.

``prepare_pointwise(cfg, out_dir)`` reads the rows (:func:`kdray.data.features.ml100k_rows` for ml-100k, or
:func:`~kdray.data.features.file_rows` with ``pointwise.categorical`` / ``pointwise.numeric`` for CSV/Parquet),
splits each user's ratings at random (``data.split_ratios``, seeded by ``data.seed``), encodes them with
:func:`~kdray.data.features.build_table` (vocabularies and standardisation from the training rows only) and writes::

    pointwise_train.parquet, pointwise_valid.parquet, pointwise_test.parquet
        user, item (int64 dense ids), cat.<field> (int64, 0 = unknown), num.<feature> (float32), like, rating
    pointwise.json
        the fingerprint of the settings, raw user / item ids, the feature spec (:class:`FeatureSpec`), row counts

A later call with the same settings and unchanged input files reuses the folder. Ray Data reads the training file
(``read_parquet``) and shards it over the Train workers; validation and test rows are small and read whole.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kdray.config import Config, fingerprint, to_dict
from kdray.data.features import PointwiseTable, build_table, file_rows, ml100k_rows, split_rows
from kdray.data.prepare import SPLITS
from kdray.errors import DataError
from kdray.layout import atomic_replace_dir

FORMAT_VERSION = 1
META = "pointwise.json"
LABELS = ("like", "rating")


def split_file(split: str) -> str:
    return f"pointwise_{split}.parquet"


@dataclass(frozen=True)
class FeatureSpec:
    """Everything needed to turn raw (user, item, features) into a model batch: what a checkpoint carries to serve."""

    user_ids: list[str]  # index = dense id
    item_ids: list[str]
    cat_names: list[str]
    cat_vocab: list[list[str]]  # per field: the value of id 1, 2, ...
    num_names: list[str]
    num_mean: list[float]
    num_std: list[float]
    like_threshold: float
    rating_mean: float
    # the fields that are constant per user (per item) in the training rows, e.g. age, genres: their encoded value
    # (categorical id, or standardised number) for every dense user (item) id, so serving needs only raw ids
    user_fields: dict[str, list[float]]
    item_fields: dict[str, list[float]]

    def model_shape(self) -> dict[str, Any]:
        """The data-dependent arguments of ``build_pointwise_model``."""
        return {"n_users": len(self.user_ids), "n_items": len(self.item_ids),
                "cardinalities": [len(v) + 1 for v in self.cat_vocab], "n_num": len(self.num_names)}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "FeatureSpec":
        return cls(**obj)

    @classmethod
    def from_table(cls, t: PointwiseTable) -> "FeatureSpec":
        train = t.split == 0
        values = np.concatenate([t.cat.astype(np.float64), t.num.astype(np.float64)], axis=1)[train]
        names = [*t.cat_names, *t.num_names]
        return cls(user_ids=t.user_ids.tolist(), item_ids=t.item_ids.tolist(), cat_names=list(t.cat_names),
                   cat_vocab=[list(v) for v in t.cat_vocab], num_names=list(t.num_names),
                   num_mean=[float(x) for x in t.num_mean], num_std=[float(x) for x in t.num_std],
                   like_threshold=t.like_threshold, rating_mean=t.rating_mean(),
                   user_fields=_constant_fields(t.user[train], values, names, t.user_ids.size),
                   item_fields=_constant_fields(t.item[train], values, names, t.item_ids.size))


def _constant_fields(ids: np.ndarray, values: np.ndarray, names: list[str], n: int) -> dict[str, list[float]]:
    """The fields whose value never varies within one id's training rows, as ``{field: [value of id 0, 1, ...]}``
    (0, the unknown id or the training mean, for an id without training rows)."""
    frame = pd.DataFrame(values, columns=names)
    groups = frame.groupby(ids)
    constant = groups.nunique().le(1).all(axis=0)
    first = groups.first().reindex(np.arange(n), fill_value=0.0)
    return {name: first[name].astype(float).tolist() for name in names if constant[name]}


@dataclass(frozen=True)
class PointwiseData:
    """A prepared pointwise folder: its path, feature spec and row counts per split."""

    path: Path
    spec: FeatureSpec
    counts: dict[str, int]
    meta: dict[str, Any]

    @property
    def n_users(self) -> int:
        return len(self.spec.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.spec.item_ids)

    @property
    def train_path(self) -> Path:
        return self.path / split_file("train")

    def columns(self, split: str) -> dict[str, np.ndarray]:
        """One split as the named arrays :func:`kdray.data.features.to_batch` takes."""
        return table_columns(pq.read_table(self.path / split_file(split)))


def table_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """A block of pointwise Parquet rows -> ``user, item, cat [N, n_cat], num [N, n_num], like, rating`` arrays."""
    names = table.column_names
    n = table.num_rows
    cat = [table.column(c).to_numpy() for c in names if c.startswith("cat.")]
    num = [table.column(c).to_numpy() for c in names if c.startswith("num.")]
    return {"user": np.array(table.column("user").to_numpy()), "item": np.array(table.column("item").to_numpy()),
            "cat": np.column_stack(cat).astype(np.int64) if cat else np.zeros((n, 0), np.int64),
            "num": np.column_stack(num).astype(np.float32) if num else np.zeros((n, 0), np.float32),
            **{k: table.column(k).to_numpy().astype(np.float32) for k in LABELS if k in names}}


def _arrow(table: PointwiseTable, split: str) -> pa.Table:
    c = table.columns(split)
    cols = {"user": c["user"], "item": c["item"]}
    cols.update({f"cat.{name}": c["cat"][:, j] for j, name in enumerate(table.cat_names)})
    cols.update({f"num.{name}": c["num"][:, j] for j, name in enumerate(table.num_names)})
    return pa.table({**cols, "like": c["like"], "rating": c["rating"]})


def _settings(cfg: Config) -> dict[str, Any]:
    return {"data": to_dict(cfg.data), "like_threshold": cfg.pointwise.like_threshold,
            "categorical": list(cfg.pointwise.categorical), "numeric": list(cfg.pointwise.numeric)}


def _inputs(cfg: Config) -> list[Path]:
    path = Path(cfg.data.path).expanduser()
    if cfg.data.source == "ml-100k":
        return [path / name for name in ("u.data", "u.user", "u.item")]
    return [path] if path.is_file() else []


def _stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _rows(cfg: Config):
    d, p = cfg.data, cfg.pointwise
    if d.path is None:
        raise DataError(f"data.path: task='pointwise' reads {d.source} from a local path; set data.path")
    path = Path(d.path).expanduser()
    if d.source == "ml-100k":
        return ml100k_rows(path)
    rows = file_rows(path, user_col=d.user_col, item_col=d.item_col, rating_col=d.rating_col or "rating",
                     categorical=p.categorical, numeric=p.numeric, sep=d.sep)
    return rows, tuple(p.categorical), tuple(p.numeric)


def prepare_pointwise(cfg: Config, out_dir: Path) -> PointwiseData:
    """Reads, splits and encodes the rows named by ``cfg`` into ``out_dir`` (see the module docstring)."""
    out_dir = Path(out_dir)
    fp = fingerprint(_settings(cfg))
    try:
        existing = load_pointwise(out_dir)
        fresh = all(not Path(s["path"]).exists() or _stamp(Path(s["path"])) == s for s in existing.meta["inputs"])
        if existing.meta.get("fingerprint") == fp and fresh:
            return existing
    except DataError:
        pass
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / META).is_file():
        raise DataError(f"{out_dir} exists and is not a prepared pointwise folder (no {META}); refusing to replace it")
    rows, categorical, numeric = _rows(cfg)
    split = split_rows(rows["user"].to_numpy(), cfg.data.split_ratios, seed=cfg.data.seed)
    table = build_table(rows, split, categorical, numeric, cfg.pointwise.like_threshold)
    counts = {name: int((table.split == s).sum()) for s, name in enumerate(SPLITS)}
    if counts["valid"] == 0 or not 0 < table.like[table.split == 1].sum() < counts["valid"]:
        raise DataError(f"{cfg.data.path}: the validation split needs liked and not-liked rows for AUC (rows per "
                        f"split {counts}, like = rating >= {cfg.pointwise.like_threshold})")
    meta = {"format_version": FORMAT_VERSION, "fingerprint": fp, "settings": _settings(cfg), "counts": counts,
            "inputs": [_stamp(f) for f in _inputs(cfg) if f.is_file()], "spec": FeatureSpec.from_table(table).to_json()}

    def fill(tmp: Path) -> None:
        for name in SPLITS:
            pq.write_table(_arrow(table, name), tmp / split_file(name))
        (tmp / META).write_text(json.dumps(meta, indent=1))

    atomic_replace_dir(out_dir, fill)
    return load_pointwise(out_dir)


def load_pointwise(out_dir: Path) -> PointwiseData:
    """Reads a folder written by :func:`prepare_pointwise`; DataError when it is missing, incomplete or corrupt."""
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / META).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{out_dir / META}: format {meta.get('format_version')}, this kdray reads {FORMAT_VERSION}")
        missing = [split_file(s) for s in SPLITS if not (out_dir / split_file(s)).is_file()]
        if missing:
            raise DataError(f"{out_dir}: missing {missing[0]}; delete the folder and prepare again")
        return PointwiseData(path=out_dir, spec=FeatureSpec.from_json(meta["spec"]), counts=meta["counts"], meta=meta)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{out_dir}: no complete prepared pointwise data ({type(e).__name__}: {e})") from None
