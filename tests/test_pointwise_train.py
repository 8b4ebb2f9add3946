"""Integration: the pointwise task through ``kdray run`` on the shared Ray cluster, on a tiny generated CSV of
ratings with features (single-task and multi-task configs), its checkpoints and the prepared data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kdray.checkpoint import load_checkpoint
from kdray.config import load_config
from kdray.data.pointwise_data import load_pointwise, prepare_pointwise
from kdray.layout import RunLayout
from kdray.pipeline import run_pipeline
from kdray.pointwise_run import _students

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def write_ratings(path: Path, n_users: int = 60, n_items: int = 40, n: int = 1500, seed: int = 0) -> Path:
    """Synthetic ratings 1..5 driven by a user taste x item genre match plus a numeric feature, with features."""
    rng = np.random.default_rng(seed)
    taste = rng.integers(0, 3, n_users)
    genre = rng.integers(0, 3, n_items)
    pairs = rng.choice(n_users * n_items, n, replace=False)
    u, i = pairs // n_items, pairs % n_items
    age = 20 + 3 * taste[u] + rng.normal(0, 2, n)
    score = 2.5 + 1.5 * (taste[u] == genre[i]) + 0.3 * (age - 23) / 3 + rng.normal(0, 0.7, n)
    pd.DataFrame({"uid": [f"u{x}" for x in u], "iid": [f"i{x}" for x in i],
                  "stars": np.clip(np.round(score), 1, 5).astype(int),
                  "taste": [f"t{x}" for x in taste[u]], "genre": [f"g{x}" for x in genre[i]],
                  "age": np.round(age, 1)}).to_csv(path, index=False)
    return path


def tiny(tmp_path: Path, config: str, *extra: str):
    csv = write_ratings(tmp_path / "ratings.csv")
    return load_config(ROOT / "configs" / config, [
        f"runs_dir={tmp_path / 'runs'}", "data.source=csv", f"data.path={csv}", "data.user_col=uid",
        "data.item_col=iid", "data.rating_col=stars", "pointwise.categorical=[taste, genre]",
        "pointwise.numeric=[age]", "teacher.dim=8", "teacher.hidden=[16]",
        "pointwise.teacher_options={cross_layers: 1}", "student.dim=4", "teacher_train.epochs=2",
        "student_train.epochs=1", "teacher_train.batch_size=256", "student_train.batch_size=256",
        "teacher_train.lr=0.01", "student_train.lr=0.01", "ray.cpus_per_worker=0.5", *extra])


def test_prepare_writes_and_reuses_the_pointwise_table(tmp_path):
    cfg = tiny(tmp_path, "ml-100k-pointwise.yaml")
    data = prepare_pointwise(cfg, tmp_path / "data")
    assert sum(data.counts.values()) == 1500 and data.spec.cat_names == ["taste", "genre"]
    cols = data.columns("train")
    assert cols["cat"].shape == (data.counts["train"], 2) and cols["num"].shape == (data.counts["train"], 1)
    assert abs(float(cols["num"].mean())) < 1e-5  # standardised with the training rows' statistics
    assert set(np.unique(cols["like"])) == {0.0, 1.0}
    stamp = (tmp_path / "data" / "pointwise.json").stat().st_mtime_ns
    assert prepare_pointwise(cfg, tmp_path / "data").spec == data.spec
    assert (tmp_path / "data" / "pointwise.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert load_pointwise(tmp_path / "data").counts == data.counts


def test_run_single_task_end_to_end(ray_cluster, tmp_path, capsys):
    cfg = tiny(tmp_path, "ml-100k-pointwise.yaml")
    report = run_pipeline(cfg, log=lambda _: None)
    labels = [r["model"] for r in report.rows]
    assert labels == ["teacher", "student (distilled)", "student (alone)"]
    for row in report.rows:
        assert 0.0 <= row["test_auc"] <= 1.0 and row["test_logloss"] > 0
        assert {"test_f1@0.5", "test_f1@best", "test_accuracy@best", "size_bytes",
                "latency_ms_per_1000_predictions"} <= set(row)
        assert "test_rmse" not in row  # no rating head
    teacher = load_checkpoint(cfg.run_dir / "teacher")
    student = load_checkpoint(cfg.run_dir / "student")
    assert teacher.args["name"] == "dcnv2" and student.args["name"] == "fm"
    assert student.features["cat_names"] == ["taste", "genre"] and len(student.features["num_mean"]) == 1
    assert student.meta["lineage"]["teachers"] == [str((cfg.run_dir / "teacher").resolve())]
    assert load_checkpoint(cfg.run_dir / "student_alone").meta["lineage"]["distill"] is None
    assert "auc" in student.metrics["history"][0] and student.metrics["valid_auc"] > 0
    text = (cfg.run_dir / "report.md").read_text()
    assert "F1@best" in text and "ms / 1k preds" in text
    # kdray eval with the run's config evaluates a pointwise checkpoint as the run did, and --output records it
    from kdray.cli import main

    record_path = tmp_path / "student.json"
    run_config = str(cfg.run_dir / "config.yaml")
    assert main(["eval", "--config", run_config, "--checkpoint", str(cfg.run_dir / "student"),
                 "--output", str(record_path)]) == 0
    record = json.loads(record_path.read_text())
    assert record["test"]["test_auc"] == pytest.approx(report.rows[1]["test_auc"])
    assert record["rows"] == load_pointwise(cfg.run_dir / "data").counts and record["model"]["name"] == "fm"
    # a ranking config cannot evaluate it: one clear line (it used to fail deep in the data's attributes)
    assert main(["eval", "--checkpoint", str(cfg.run_dir / "student"), f"runs_dir={tmp_path / 'ranking'}"]) == 2
    assert "is a pointwise model; evaluate it with the config of its run" in capsys.readouterr().err
    # a second run reuses every stage
    lines: list[str] = []
    run_pipeline(cfg, log=lines.append)
    assert sum("reusing" in line for line in lines) == 3
    assert "auc" in load_checkpoint(cfg.run_dir / "teacher").metrics["history"][1]


def test_multitask_config_adds_single_task_students_alone_and_distilled(tmp_path):
    cfg = tiny(tmp_path, "ml-100k-multitask.yaml")
    stages = {label: (sub.pointwise.heads, sub.distill.loss) for label, sub, _ in _students(cfg, RunLayout(tmp_path))}
    assert stages == {"multi-task student (distilled)": (("like", "rating"), "soft_bce"),
                      "multi-task student (alone)": (("like", "rating"), "none"),
                      "single-task student (distilled)": (("like",), "soft_bce"),
                      "single-task student (alone)": (("like",), "none")}


def test_run_multitask_end_to_end(ray_cluster, tmp_path):
    # the single-task rows of this config are two more students of the kind the single-task run trains (see above)
    cfg = tiny(tmp_path, "ml-100k-multitask.yaml", "pointwise.teacher_options={multitask: mmoe, n_experts: 2}",
               "pointwise.compare_single_task=false")
    report = run_pipeline(cfg, log=lambda _: None)
    rows = {r["model"]: r for r in report.rows}
    assert list(rows) == ["teacher", "multi-task student (distilled)", "multi-task student (alone)"]
    assert load_checkpoint(cfg.run_dir / "teacher").args["multitask"] == "mmoe"
    for row in rows.values():
        assert row["heads"] == ["like", "rating"] and row["test_rmse"] > 0 and row["test_mae"] > 0
    summary = json.loads((cfg.run_dir / "metrics.json").read_text())
    assert len(summary["rows"]) == 3 and "RMSE" in (cfg.run_dir / "report.md").read_text()
