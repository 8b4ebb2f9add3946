"""Readers: every supported interaction source as one :class:`RawData` (MovieLens 100K/1M/10M/20M/25M with the 100K
side features, the LightGCN ``train.txt``/``test.txt`` layout, CSV/Parquet with a column map, or the built-in
generator). Files are read with the pandas C parser / pyarrow; any malformed input raises
:class:`~kdray.errors.DataError` naming the file, the line (1-based) or column, and what was expected."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kdray.config import DataConfig, separator
from kdray.data.download import download_movielens
from kdray.data.synthetic import generate
from kdray.errors import DataError

ML_RATINGS = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-10m": "ratings.dat", "ml-20m": "ratings.csv",
              "ml-25m": "ratings.csv"}


RATING_FIELDS = ("user", "item", "rating", "timestamp")


@dataclass(frozen=True, eq=False)
class Features:
    """Side features of users or items, keyed by raw id."""

    ids: np.ndarray  # [n] raw ids
    values: np.ndarray  # [n, F] float32
    names: tuple[str, ...]  # [F] column names, e.g. "gender=F"
    source: Path | None = None  # the file they came from (for messages)


@dataclass(frozen=True, eq=False)
class RawData:
    """Interactions as read, one entry per row: raw ids, nothing filtered or remapped."""

    users: np.ndarray  # [N] raw user ids (int64, or str for a CSV/Parquet with string ids)
    items: np.ndarray  # [N] raw item ids
    ratings: np.ndarray | None = None  # [N] float64
    timestamps: np.ndarray | None = None  # [N] int64 or float64, any unit: only the order is used
    is_test: np.ndarray | None = None  # [N] bool: the file's own test split (lightgcn)
    user_features: Features | None = None
    item_features: Features | None = None
    files: tuple[Path, ...] = ()  # the files read (recorded in meta.json; a change triggers a fresh prepare)


def require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path} does not exist; expected {what}")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path} is empty; expected {what}")
    return path


def _line(path: Path, number: int, encoding: str = "latin-1") -> str:
    """Line ``number`` (1-based) of a file, for error messages only."""
    with path.open("r", encoding=encoding, newline="") as f:
        for i, text in enumerate(f, 1):
            if i == number:
                return text.rstrip("\r\n")
    return ""


def _first_bad_line(path: Path, sep: str, n_fields: int) -> tuple[int, str]:
    """The first non-blank line without ``n_fields`` fields (error path only)."""
    with path.open("r", encoding="latin-1", newline="") as f:
        for i, text in enumerate(f, 1):
            text = text.rstrip("\r\n")
            if text.strip() and len(text.split(sep)) != n_fields:
                return i, text
    return 1, _line(path, 1)


def read_text_table(path: Path, fields: Sequence[str], what: str, *, sep: str, header: bool = False,
                     data: bytes | None = None, shown_sep: str | None = None,
                     required: Sequence[str] | None = None, quoting: int = csv.QUOTE_NONE,
                     leading_fields: bool = False) -> pd.DataFrame:
    """Reads a delimited file with the pandas C parser into columns ``fields``; blank lines are skipped. Wrong
    field counts, empty ``required`` fields (default: all) and unparsable files raise DataError naming the line.
    ``data`` replaces the file's bytes (``::`` files are re-delimited first); ``shown_sep`` is the separator named
    in messages. ``quoting``: MovieLens files use none (a title may hold a '"'); CSV files may quote fields.
    ``leading_fields``: a headerless file may have more columns than ``fields``; the first ones are read.
    The returned frame's index is each row's line number."""
    shown_sep = shown_sep or sep
    first = 2 if header else 1  # line number of the first data row
    try:
        df = pd.read_csv(io.BytesIO(data) if data is not None else path, sep=sep, header=0 if header else None,
                         engine="c", quoting=quoting, skip_blank_lines=False, encoding="latin-1",
                         low_memory=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; expected {what}") from None
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if not m:
            raise DataError(f"{path}: cannot parse ({e}); expected {what}") from None
        line = int(m.group(2))
        raise DataError(f"{path} line {line}: expected {len(fields)} fields separated by {shown_sep!r} ({what}), "
                        f"found {m.group(3)}: {_line(path, line)!r}") from None
    blank = df.isna().all(axis=1).to_numpy()
    if header:
        missing = [c for c in fields if c not in df.columns]
        if missing:
            raise DataError(f"{path}: missing column {missing[0]!r}; the header has {list(df.columns)}, "
                            f"expected {what}")
        df = df[list(fields)]
    elif df.shape[1] != len(fields) and not (leading_fields and df.shape[1] > len(fields)):
        line, text = _first_bad_line(path, shown_sep, len(fields))
        raise DataError(f"{path} line {line}: expected {len(fields)} fields separated by {shown_sep!r} ({what}), "
                        f"found {len(text.split(shown_sep))}: {text!r}")
    else:
        df = df.iloc[:, :len(fields)]
        df.columns = list(fields)
    if blank.any():
        df = df[~blank]
    df.index = np.flatnonzero(~blank) + first  # the line number of every row, for the messages below
    if df.empty:
        raise DataError(f"{path} has no data rows; expected {what}")
    for col in required if required is not None else fields:
        na = df[col].isna().to_numpy()
        if na.any():
            line = int(df.index[np.argmax(na)])
            text = _line(path, line)
            n = len(text.split(shown_sep))
            if n < len(fields) or (n > len(fields) and not leading_fields):
                raise DataError(f"{path} line {line}: found {n} fields; expected "
                                f"{len(fields)} separated by {shown_sep!r} ({what}): {text!r}")
            raise DataError(f"{path} line {line}: column {col!r} is empty or NaN; expected a value ({what}): "
                            f"{text!r}")
    return df


def numeric_column(df: pd.DataFrame, col: str, path: Path, *, integer: bool, where: str = "line") -> np.ndarray:
    """A column as int64/float64; the first non-numeric (or non-integer, or past 64 bits) value raises DataError
    with its row."""
    values = df[col]
    id_hint = " (expected an integer id)" if integer else ""
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        # The parser left text (or mixed cells such as " 4"): check every cell in Python (rare, small files).
        cells = values.tolist()
        for row, cell in zip(df.index, cells):
            try:
                _as_number(cell, integer)
            except ValueError as e:
                raise DataError(f"{path} {where} {row}: {col} {_shown(cell)} {e}{id_hint}") from None
        return np.array([_as_number(c, integer) for c in cells], dtype=np.int64 if integer else np.float64)
    arr = values.to_numpy()
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(np.argmax(~np.isfinite(arr)))
        raise DataError(f"{path} {where} {df.index[bad]}: {col} is {arr[bad].item()}; expected a finite number")
    if integer:
        if arr.dtype.kind == "f":
            frac = arr != np.round(arr)
            if frac.any():
                row = df.index[np.argmax(frac)]
                raise DataError(f"{path} {where} {row}: {col} {arr[np.argmax(frac)].item()!r} is not an integer id")
        # uint64 past 2**63 - 1 and floats past +-2**63 would wrap or saturate in astype(int64): two ids become one
        big = arr > np.iinfo(np.int64).max if arr.dtype.kind == "u" else \
            np.abs(arr) >= 2.0 ** 63 if arr.dtype.kind == "f" else np.zeros(arr.shape, dtype=bool)
        if big.any():
            row = df.index[np.argmax(big)]
            raise DataError(f"{path} {where} {row}: {col} {arr[np.argmax(big)].item()!r} is out of the 64-bit "
                            f"integer range{id_hint}")
        return arr.astype(np.int64)
    return arr.astype(np.float64)


def _as_number(cell: Any, integer: bool) -> int | float:
    """One cell as a finite float, or as an int within int64 when ``integer``; ValueError says what is wrong."""
    if isinstance(cell, (bool, np.bool_)) or cell is None:
        raise ValueError("is not a number")
    text = cell.strip() if isinstance(cell, str) else cell
    try:
        number = float(text)
    except (TypeError, ValueError):
        raise ValueError("is not a number") from None
    except OverflowError:
        number = float("inf")
    if not integer:
        if not np.isfinite(number):
            raise ValueError("is not a finite number")
        return number
    try:
        whole = int(text)
    except (TypeError, ValueError, OverflowError):
        if not (np.isfinite(number) and number.is_integer()):
            raise ValueError("is not an integer") from None
        whole = int(number)
    if not -2 ** 63 <= whole < 2 ** 63:
        raise ValueError("is out of the 64-bit integer range")
    return whole


def _shown(value: Any) -> str:
    """A cell for a message: its repr, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def ratings_table(path: Path, source: str) -> RawData:
    """MovieLens ratings: user, item, rating, timestamp (u.data: tab; ratings.dat: '::'; ratings.csv: header)."""
    what = "user item rating timestamp"
    require_file(path, f"the {source} ratings file ({what})")
    if path.name == "ratings.csv":
        df = read_text_table(path, ("userId", "movieId", "rating", "timestamp"),
                              "a header userId,movieId,rating,timestamp", sep=",", header=True,
                              quoting=csv.QUOTE_MINIMAL)
        df.columns = list(RATING_FIELDS)
    elif path.name == "ratings.dat":
        # The C parser takes one-character separators only; '::' -> '\t' keeps the lines (and line numbers) intact.
        df = read_text_table(path, RATING_FIELDS, what, sep="\t", data=path.read_bytes().replace(b"::", b"\t"),
                              shown_sep="::")
    else:
        df = read_text_table(path, RATING_FIELDS, what, sep="\t")
    return RawData(users=numeric_column(df, "user", path, integer=True), items=numeric_column(df, "item", path, integer=True),
                   ratings=numeric_column(df, "rating", path, integer=False),
                   timestamps=numeric_column(df, "timestamp", path, integer=True), files=(path,))


def _ml100k_features(folder: Path) -> tuple[Features, Features, tuple[Path, ...]]:
    """u.user -> [age min-max scaled, gender one-hot, occupation one-hot]; u.item -> the 19 genre flags."""
    hint = "(or set data.side_features=false)"
    upath, ipath = folder / "u.user", folder / "u.item"
    require_file(upath, f"u.user (user|age|gender|occupation|zip) for the side features {hint}")
    users = read_text_table(upath, ("user", "age", "gender", "occupation", "zip"), "user|age|gender|occupation|zip",
                             sep="|", required=("user", "age", "gender", "occupation"))
    age = numeric_column(users, "age", upath, integer=False)
    gender = users["gender"].astype(str).str.strip()
    if not gender.isin(["M", "F"]).all():
        row = users.index[np.argmax(~gender.isin(["M", "F"]).to_numpy())]
        raise DataError(f"{upath} line {row}: gender {gender.loc[row]!r}; expected M or F")
    occupation = users["occupation"].astype(str).str.strip()
    occupations = sorted(occupation.unique())
    span = age.max() - age.min()
    uvalues = np.column_stack([(age - age.min()) / span if span > 0 else np.zeros_like(age),
                               (gender == "F").to_numpy(), (gender == "M").to_numpy(),
                               *[(occupation == o).to_numpy() for o in occupations]]).astype(np.float32)
    unames = ("age", "gender=F", "gender=M", *(f"occupation={o}" for o in occupations))

    require_file(ipath, f"u.item (item|title|release|video release|url|19 genre flags) for the side features {hint}")
    fields = ("item", "title", "release", "video_release", "url", *(f"g{j}" for j in range(19)))
    items = read_text_table(ipath, fields, "item|title|release date|video release date|IMDb URL|19 genre flags",
                             sep="|", required=("item", *fields[5:]))
    genres = np.column_stack([numeric_column(items, f"g{j}", ipath, integer=True) for j in range(19)])
    if not np.isin(genres, (0, 1)).all():
        row = items.index[np.argmax(~np.isin(genres, (0, 1)).all(axis=1))]
        raise DataError(f"{ipath} line {row}: genre flags must be 0 or 1")
    gpath = folder / "u.genre"
    names = [line.split("|")[0] for line in gpath.read_text(encoding="latin-1").splitlines() if line.strip()] \
        if gpath.is_file() else []
    inames = tuple(f"genre={g}" for g in names) if len(names) == 19 else tuple(f"genre_{j}" for j in range(19))
    return (Features(unique_ids(users, "user", upath), uvalues, unames, upath),
            Features(unique_ids(items, "item", ipath), genres.astype(np.float32), inames, ipath),
            (upath, ipath))


def unique_ids(df: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    """The integer ids of a side-feature file, one row per id: a repeated id is a DataError naming both lines."""
    ids = numeric_column(df, col, path, integer=True)
    repeated = pd.Series(ids).duplicated().to_numpy()
    if repeated.any():
        at = int(np.argmax(repeated))
        first = int(np.argmax(ids == ids[at]))
        raise DataError(f"{path} line {df.index[at]}: {col} {ids[at]} already has a row (line {df.index[first]}); "
                        f"expected one row per {col}")
    return ids


def _lightgcn_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``user item item ...`` per line (a user with no items is allowed) -> parallel (user, item) arrays."""
    require_file(path, "lines 'user item item ...' of integer ids (the LightGCN layout)")
    lines = path.read_text(encoding="latin-1").splitlines()
    parts = [line.split() for line in lines]
    counts = np.array([len(p) for p in parts], dtype=np.int64)
    try:
        tokens = np.array([t for p in parts for t in p], dtype=np.int64)
    except (ValueError, OverflowError):
        def bad(token: str) -> bool:  # not an integer, or one past int64
            return not re.fullmatch(r"[+-]?\d+", token) or not -2 ** 63 <= int(token) < 2 ** 63
        line = next(i for i, p in enumerate(parts, 1) if any(bad(t) for t in p))
        raise DataError(f"{path} line {line}: expected integer ids 'user item item ...' (64-bit), got "
                        f"{lines[line - 1][:200]!r}") from None
    if tokens.size == 0:
        raise DataError(f"{path} has no data lines; expected 'user item item ...'")
    if tokens.size == int((counts > 0).sum()):
        raise DataError(f"{path}: no line lists an item (every line is a lone user id); expected 'user item item ...'")
    nonblank = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonblank]
    users = tokens[starts]
    n_items = counts[nonblank] - 1
    item_mask = np.ones(tokens.size, dtype=bool)
    item_mask[starts] = False
    return np.repeat(users, n_items), tokens[item_mask]


def _check_parquet_type(path: Path, col: str, dtype: pa.DataType, role: str) -> None:
    """Ids are integers or text, ratings numbers, timestamps numbers, dates or text; anything else (binary, lists,
    structs, booleans, decimals, all-null columns) raises DataError naming the column and its type."""
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    text = pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
    number = pa.types.is_integer(dtype) or pa.types.is_floating(dtype)
    ok = {"id": number or text, "rating": number,
          "timestamp": number or text or pa.types.is_timestamp(dtype) or pa.types.is_date(dtype)}[role]
    if not ok:
        expected = {"id": "integers or strings", "rating": "numbers",
                    "timestamp": "numbers, dates, timestamps or date strings"}[role]
        raise DataError(f"{path}: column {col!r} has Parquet type {dtype}; expected {expected}")


def _mapped_table(cfg: DataConfig, path: Path) -> RawData:
    """A CSV or Parquet file (or Parquet folder) with the columns named by the config's column map."""
    cols = [c for c in (cfg.user_col, cfg.item_col, cfg.rating_col, cfg.timestamp_col) if c]
    what = f"the columns {cols} (data.user_col, item_col, rating_col, timestamp_col)"
    if cfg.source == "csv" and not cfg.header:
        what = (f"{len(cols)} columns without a header row, in this order: {', '.join(cols)} "
                "(data.header=false; set data.rating_col / data.timestamp_col to read the 3rd / 4th)")
    require_file(path, f"a {cfg.source} file with {what}")
    if cfg.source == "csv":
        df = read_text_table(path, cols, what, sep=separator(cfg.sep), header=cfg.header,
                              quoting=csv.QUOTE_MINIMAL, leading_fields=not cfg.header)
        where = "line"
    else:
        try:
            schema = pq.read_schema(path) if path.is_file() else pq.ParquetDataset(path).schema
            missing = [c for c in cols if c not in schema.names]
            if missing:
                raise DataError(f"{path}: missing column {missing[0]!r}; the file has {schema.names}, expected {what}")
            for col in cols:
                _check_parquet_type(path, col, schema.field(col).type,
                                    "timestamp" if col == cfg.timestamp_col else
                                    "rating" if col == cfg.rating_col else "id")
            df = pq.read_table(path, columns=cols).to_pandas()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        if df.empty:
            raise DataError(f"{path} has no rows; expected {what}")
        df.index = np.arange(1, len(df) + 1)
        where = "row"
        for col in cols:
            na = df[col].isna().to_numpy()
            if na.any():
                raise DataError(f"{path} row {df.index[np.argmax(na)]}: column {col!r} is missing (null)")

    def ids(col: str) -> np.ndarray:
        values = df[col]
        if pd.api.types.is_integer_dtype(values) or pd.api.types.is_float_dtype(values):
            return numeric_column(df, col, path, integer=True, where=where)
        return values.astype(str).str.strip().to_numpy(dtype=object)  # string ids, kept as text

    timestamps = None
    if cfg.timestamp_col:
        col = df[cfg.timestamp_col]
        if pd.api.types.is_numeric_dtype(col):
            timestamps = numeric_column(df, cfg.timestamp_col, path, integer=False, where=where)
        else:
            parsed = pd.to_datetime(col, errors="coerce", utc=True, format="mixed")
            bad = parsed.isna().to_numpy()
            if bad.any():
                row = df.index[np.argmax(bad)]
                raise DataError(f"{path} {where} {row}: {cfg.timestamp_col} {col.loc[row]!r} is neither a number "
                                "nor a date/time")
            timestamps = parsed.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    return RawData(users=ids(cfg.user_col), items=ids(cfg.item_col),
                   ratings=numeric_column(df, cfg.rating_col, path, integer=False, where=where) if cfg.rating_col else None,
                   timestamps=timestamps, files=(path,))


def _source_path(cfg: DataConfig) -> Path:
    path = Path(cfg.path).expanduser() if cfg.path else None
    if cfg.download and (path is None or not path.exists()):
        return download_movielens(cfg.source, Path(cfg.cache_dir), cfg.url)
    if path is None:
        raise DataError(f"data.path is not set; data.source={cfg.source!r} reads files")
    if not path.exists():
        hint = " (or set data.download=true)" if cfg.source.startswith("ml-") else ""
        raise DataError(f"data.path {path} does not exist{hint}")
    return path


def load_raw(cfg: DataConfig) -> RawData:
    """Reads (or generates) the interactions named by ``cfg``: raw ids, no filtering."""
    if cfg.source == "synthetic":
        g = generate(n_users=cfg.n_users, n_items=cfg.n_items, n_interactions=cfg.n_interactions,
                     n_clusters=cfg.n_clusters, latent_dim=cfg.latent_dim,
                     popularity_exponent=cfg.popularity_exponent, seed=cfg.seed)
        return RawData(users=g.users, items=g.items, timestamps=g.timestamps)
    path = _source_path(cfg)
    if cfg.source in ML_RATINGS:
        folder = path.parent if path.is_file() else path
        raw = ratings_table(folder / ML_RATINGS[cfg.source], cfg.source)
        if cfg.source == "ml-100k" and cfg.side_features:
            ufeat, ifeat, files = _ml100k_features(folder)
            raw = RawData(**{**raw.__dict__, "user_features": ufeat, "item_features": ifeat,
                             "files": raw.files + files})
        return raw
    if cfg.source == "lightgcn":
        if not path.is_dir():
            raise DataError(f"data.path {path}: expected a folder holding train.txt and test.txt (LightGCN layout)")
        tr_u, tr_i = _lightgcn_file(path / "train.txt")
        te_u, te_i = _lightgcn_file(path / "test.txt")
        return RawData(users=np.concatenate([tr_u, te_u]), items=np.concatenate([tr_i, te_i]),
                       is_test=np.repeat([False, True], [tr_u.size, te_u.size]),
                       files=(path / "train.txt", path / "test.txt"))
    return _mapped_table(cfg, path)


# ----------------------------------------------------------------------------------------------------------------
# Filtering and splitting (pure functions of arrays).
