"""Incremental refresh (``kdray update``): new interactions into a trained run's student, as a new version.

    kdray update --run RUNS/NAME --interactions NEW.parquet [--checkpoint DIR] [--epochs 3] [--rollout]

1. **Read** the new rows: a Parquet or CSV file with the columns ``user``, ``item`` and optionally ``timestamp``
   (raw ids, as in the run's source). Any other column, a missing one, or a row with an empty id or a non-numeric
   timestamp is a :class:`~kdray.errors.DataError` naming the file, the row and the column.
2. **Grow** the run's latest version (``RUN/versions/N``, else the run's own ``data/`` and ``student/``): new raw
   user and item ids get the next dense ids (existing ids keep theirs, so a served id never changes meaning), the new
   pairs join the training split (a pair that was a validation or test pair moves to training: no pair is in two
   splits), and the student's embedding tables grow: existing rows are copied, new rows initialised as training
   initialises them (seeded ``model_from_config``), new side-feature rows are zeros.
3. **Train** a short warm-started run on Ray Train through the same driver as every other training
   (:func:`kdray.train.driver.train_model` with ``initial_model``), selecting the best epoch on validation.
   The teacher guides it when its checkpoint is there and matches the grown data, which holds only when no new user
   or item arrived: a teacher knows only the ids it was trained on and cannot score a new user's catalog nor any user
   on a new item, so when the vocabularies grew the refresh trains without distillation and says so (retraining the
   teacher is a full run, ``kdray run``).
4. **Evaluate** on the grown test split and **export** ``RUN/versions/N+1/{data,student,update.json}``.
5. **Roll out** (``--rollout``): ``kdray.serve.app.serve_checkpoint`` redeploys the running Serve application under
   its name, the zero-downtime rolling update (new replicas start before old ones stop). The application must be
   running on the cluster the command connects to (``--address``); that is checked before any training.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdray.checkpoint import check_matches_data, is_complete, load_checkpoint
from kdray.config import Config, fingerprint, replace
from kdray.data.prepare import PreparedData, load_prepared, write_prepared
from kdray.distill import without_distillation
from kdray.errors import CheckpointError, DataError, KdrayError
from kdray.evaluate import evaluate_checkpoint
from kdray.layout import RunLayout, atomic_write_text
from kdray.models import RecModel, model_from_config
from kdray.sparse import Csr
from kdray.train.driver import train_model

COLUMNS = ("user", "item")
OPTIONAL_COLUMNS = ("timestamp",)
UPDATE_RECORD = "update.json"


# ----------------------------------------------------------------------------------------------------------------
# Reading the new interactions


def read_interactions(path: str | Path) -> pd.DataFrame:
    """The rows of a Parquet or CSV interactions file as a frame of ``user``, ``item`` (str) and ``timestamp``
    (float, NaN when the file has none); raises DataError naming the file, row (1-based, after the header) and
    column of the first problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"interactions file {path} does not exist")
    try:
        if path.suffix.lower() == ".parquet":
            frame = pq.read_table(path).to_pandas()
        elif path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            raise DataError(f"{path}: interactions must be a .parquet or .csv file")
    except (OSError, ValueError, pa.ArrowException, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot be read as {path.suffix[1:]} ({type(e).__name__}: {e})") from None
    allowed = (*COLUMNS, *OPTIONAL_COLUMNS)
    missing = [c for c in COLUMNS if c not in frame.columns]
    extra = [str(c) for c in frame.columns if c not in allowed]
    if missing or extra:
        what = "; ".join(x for x in (missing and f"missing column(s) {missing}", extra and f"unexpected column(s) "
                                     f"{extra}") if x)
        raise DataError(f"{path}: {what}; expected the columns user, item and optionally timestamp")
    if frame.empty:
        raise DataError(f"{path}: no interactions (the file has a header and no rows)")
    out = pd.DataFrame({c: frame[c].map(_raw_id) for c in COLUMNS})
    for col in COLUMNS:
        bad = out[col].isna().to_numpy()
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"{path}: row {row + 1}, column {col!r}: empty id {frame[col].iloc[row]!r}")
    if "timestamp" in frame.columns:
        when = pd.to_numeric(frame["timestamp"], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(when)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"{path}: row {row + 1}, column 'timestamp': {frame['timestamp'].iloc[row]!r} is not "
                            "a number (seconds since the epoch)")
        out["timestamp"] = when
    else:
        out["timestamp"] = np.nan
    return out


def _raw_id(value: Any) -> str | None:
    """A raw id as the prepared vocabularies store it (a string; an integral float such as 196.0 is "196")."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


# ----------------------------------------------------------------------------------------------------------------
# Growing the data and the model


def _grown_ids(known: np.ndarray, raw: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(all ids: the known ones then the new ones in order of first appearance, dense id of every raw value)."""
    index = pd.Index(known)
    new = pd.unique(raw[index.get_indexer(raw) < 0].to_numpy())
    ids = np.concatenate([known, np.asarray(new, dtype=str)]).astype(str)
    return ids, pd.Index(ids).get_indexer(raw).astype(np.int64)


def _resized(csr: Csr, n_rows: int, n_cols: int, drop: Csr | None = None) -> Csr:
    """``csr`` with more (empty) rows and columns, less the pairs of ``drop``."""
    rows, cols = csr.rows_of(), csr.indices
    if drop is not None and rows.size:
        keys = rows * np.int64(n_cols) + cols
        keep = ~np.isin(keys, drop.rows_of() * np.int64(n_cols) + drop.indices)
        rows, cols = rows[keep], cols[keep]
    return Csr.from_pairs(rows, cols, n_rows, n_cols)


def _grown_features(features: np.ndarray | None, n: int) -> np.ndarray | None:
    if features is None:
        return None
    return np.concatenate([features, np.zeros((n - features.shape[0], features.shape[1]), features.dtype)])


def grow_data(base: PreparedData, rows: pd.DataFrame, source: str) -> PreparedData:
    """``base`` with the vocabularies grown for the new ids of ``rows`` and its pairs added to training (in memory;
    :func:`kdray.data.prepare.write_prepared` writes it)."""
    user_ids, users = _grown_ids(base.user_ids, rows["user"])
    item_ids, items = _grown_ids(base.item_ids, rows["item"])
    n_users, n_items = user_ids.size, item_ids.size
    new = Csr.from_pairs(users, items, n_users, n_items)
    train_rows = np.concatenate([base.train.rows_of(), new.rows_of()])
    train = Csr.from_pairs(train_rows, np.concatenate([base.train.indices, new.indices]), n_users, n_items)
    valid, test = (_resized(s, n_users, n_items, drop=new) for s in (base.valid, base.test))
    counts = {"train": train.nnz, "valid": valid.nnz, "test": test.nnz}
    update = {"source": source, "rows": len(rows), "new_pairs": train.nnz - base.train.nnz,
              "new_users": n_users - base.n_users, "new_items": n_items - base.n_items, "from": str(base.path)}
    meta = {**base.meta, "n_users": n_users, "n_items": n_items, "counts": {**base.meta.get("counts", {}), **counts},
            "fingerprint": fingerprint({"base": base.meta.get("fingerprint"), "update": update}),
            "updates": [*base.meta.get("updates", []), update]}
    return PreparedData(path=base.path, n_users=n_users, n_items=n_items, train=train, valid=valid, test=test,
                        user_ids=user_ids, item_ids=item_ids,
                        user_features=_grown_features(base.user_features, n_users),
                        item_features=_grown_features(base.item_features, n_items), meta=meta)


def grow_model(old: RecModel, fresh: RecModel) -> RecModel:
    """``fresh`` (built for the grown data) with every learned parameter's first rows copied from ``old``: existing
    users and items keep their vectors, new rows keep ``fresh``'s initialisation. Buffers (side features, a LightGCN
    graph) stay ``fresh``'s: they describe the grown data."""
    old_params = dict(old.named_parameters())
    with torch.no_grad():
        for name, param in fresh.named_parameters():
            prev = old_params[name]
            if prev.shape == param.shape:
                param.copy_(prev)
            elif prev.shape[1:] == param.shape[1:] and prev.shape[0] <= param.shape[0]:
                param[: prev.shape[0]].copy_(prev)
            else:
                raise CheckpointError(f"parameter {name}: the checkpoint's shape {tuple(prev.shape)} cannot grow into "
                                      f"{tuple(param.shape)}; is the checkpoint the run's student?")
    return fresh


# ----------------------------------------------------------------------------------------------------------------
# The refresh


@dataclass(frozen=True)
class UpdateOutcome:
    version: int
    directory: Path  # RUN/versions/N
    checkpoint: Path  # its student
    record: dict[str, Any]  # what update.json holds


def latest_version(layout: RunLayout) -> tuple[int, Path, Path]:
    """(version, student checkpoint, prepared data) of the run's newest complete version."""
    done = sorted(int(p.name) for p in layout.versions.glob("*") if p.name.isdigit()
                  and is_complete(p / "student")) if layout.versions.is_dir() else []
    if done:
        return done[-1], layout.version(done[-1]) / "student", layout.version(done[-1]) / "data"
    return 1, layout.student, layout.data


def _teachers_for(cfg: Config, layout: RunLayout, data: PreparedData, grew: bool) -> tuple[list[Path], str]:
    """The teacher checkpoints to distil from, or none and why."""
    if cfg.distill.loss == "none" or cfg.distill.alpha == 0:
        return [], "the run's student trains without distillation"
    if grew:
        return [], ("new users or items arrived: the teacher knows only the ids it was trained on, so it cannot score "
                    "them (retrain it with kdray run)")
    paths = [layout.teacher(i) for i in range(cfg.distill.n_teachers)]
    if not all(is_complete(p) for p in paths):
        return [], f"no complete teacher checkpoint at {', '.join(map(str, paths))}"
    try:
        for p in paths:
            check_matches_data(load_checkpoint(p), data)
    except CheckpointError as e:
        return [], f"the teacher does not match the data: {e}"
    return paths, "distilled from " + ", ".join(map(str, paths))


def _require_running_app() -> None:
    from ray import serve

    from kdray.serve.app import APP_NAME

    if APP_NAME not in serve.status().applications:
        raise KdrayError(f"--rollout: no Serve application {APP_NAME!r} runs on this Ray cluster; start one with "
                         "`kdray serve`, and pass its cluster with --address")


def update_run(cfg: Config, run_dir: str | Path, rows: pd.DataFrame, *, source: str,
               checkpoint: str | Path | None = None, epochs: int = 3, rollout: bool = False,
               log: Callable[[str], None] = print) -> UpdateOutcome:
    """Folds ``rows`` (from :func:`read_interactions` of the file ``source``) into the run's latest student (or
    ``checkpoint``, which must match the latest version's data) and exports the next version; see the module
    docstring. Ray must be initialised."""
    t0 = time.perf_counter()
    if epochs < 1:
        raise KdrayError(f"--epochs: {epochs} must be >= 1")
    layout = RunLayout(Path(run_dir))
    if rollout:
        _require_running_app()
    base_version, base_ckpt, base_data_dir = latest_version(layout)
    base_data = load_prepared(base_data_dir)
    base = load_checkpoint(checkpoint or base_ckpt)
    check_matches_data(base, base_data)
    version = base_version + 1
    out = layout.version(version)
    data = write_prepared(grow_data(base_data, rows, source), out / "data")
    grew = data.n_users > base_data.n_users or data.n_items > base_data.n_items
    log(f"[update] version {version}: {len(rows)} rows, {data.meta['updates'][-1]['new_pairs']} new pairs, "
        f"{data.n_users - base_data.n_users} new users, {data.n_items - base_data.n_items} new items")

    teachers, teacher_note = _teachers_for(cfg, layout, data, grew)
    train_cfg = replace(cfg if teachers else without_distillation(cfg),
                        **{"student_train.epochs": epochs, "distill.init_from_teacher": False})
    log(f"[update] warm start from {base.path}; teacher: {teacher_note}")
    torch.manual_seed(train_cfg.student_train.seed)
    initial = grow_model(base.model, model_from_config(train_cfg.student, data))
    outcome = train_model(train_cfg, "student", data, out_dir=out / "student", teachers=teachers,
                          name=f"update-v{version}-{time.time_ns()}", storage_path=str(layout.ray.resolve()),
                          initial_model=initial)
    test = evaluate_checkpoint(outcome.checkpoint, data, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size)
    train_seconds = time.perf_counter() - t0
    rollout_seconds = None
    if rollout:
        from kdray.serve.app import serve_checkpoint

        t1 = time.perf_counter()
        serve_checkpoint(outcome.checkpoint, cfg.serve, blocking=False)
        rollout_seconds = time.perf_counter() - t1
    record = {"version": version, "from": str(base.path), "data": data.meta["updates"][-1], "teacher": teacher_note,
              "epochs": epochs, "valid": outcome.metrics, "test": test, "update_seconds": train_seconds,
              "rollout_seconds": rollout_seconds}
    atomic_write_text(out / UPDATE_RECORD, json.dumps(record, indent=2, default=str) + "\n")
    metric = f"test_{cfg.select_metric}"
    log(f"[update] version {version} at {outcome.checkpoint}: {metric} {test.get(metric, float('nan')):.4f} "
        f"({train_seconds:.0f} s{f', rolled out in {rollout_seconds:.1f} s' if rollout else ''})")
    return UpdateOutcome(version=version, directory=out, checkpoint=outcome.checkpoint, record=record)
