"""Integration: teacher and student on Ray Train (the shared local cluster), checkpoints, the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kdray.checkpoint import load_checkpoint
from kdray.cli import main
from kdray.config import load_config
from kdray.evaluate import evaluate_checkpoint
from kdray.pipeline import prepare_data
from kdray.train.driver import train_model

pytestmark = pytest.mark.ray

TINY = [
    "data.n_users=120", "data.n_items=80", "data.n_interactions=3000", "data.n_clusters=4",
    "teacher.name=mf", "teacher.dim=32", "teacher.hidden=[]", "student.dim=4",
    "teacher_train.epochs=3", "student_train.epochs=2", "teacher_train.lr=0.02", "student_train.lr=0.02",
    "teacher_train.batch_size=32", "student_train.batch_size=32", "eval.batch_size=64", "distill.n_teachers=1",
    "distill.init_from_teacher=false", "distill.alpha=0.5",
    "teacher_search.enabled=false",  # the teacher search has its own tests (test_kdray_run_end_to_end, test_study)
]


def tiny(tmp_path: Path, *extra: str):
    return load_config(None, [*TINY, f"runs_dir={tmp_path}", *extra])


def _weights_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256((path / "model.pt").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    """One teacher trained once for the module (Ray Train, 1 worker)."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny(tmp)
    data = prepare_data(cfg)
    outcome = train_model(cfg, "teacher", data, out_dir=cfg.run_dir / "teacher", name="teacher-test")
    return cfg, data, outcome


def test_teacher_trains_loss_falls_and_checkpoint_loads(trained):
    cfg, data, outcome = trained
    losses = [h["loss"] for h in outcome.history]
    assert len(losses) == cfg.teacher_train.epochs
    assert losses[-1] < losses[0]
    ckpt = load_checkpoint(outcome.checkpoint)
    assert ckpt.meta["role"] == "teacher"
    assert ckpt.model.n_items == data.n_items and ckpt.args["dim"] == 32
    assert ckpt.metrics["valid_ndcg@10"] == pytest.approx(max(h["ndcg@10"] for h in outcome.history))
    assert list(ckpt.vocab.item_ids) == list(data.item_ids)
    metrics = evaluate_checkpoint(outcome.checkpoint, data, ks=(10,))
    assert 0.0 <= metrics["test_ndcg@10"] <= 1.0 and metrics["n_params"] == 32 * (data.n_users + data.n_items) + data.n_items


# Each case is one Ray Train run (~20 s on 2 cores): together they cover a live teacher under DDP, the cached top-K
# with a PCA start and a streamed shard, sampled softmax, and the kl, rd, rrd and mse losses (listwise is in
# test_lightgcn_train).
@pytest.mark.parametrize("extra", [
    ["distill.loss=kl", "distill.alpha=0.5", "distill.temperature=2", "ray.num_workers=2", "ray.cpus_per_worker=0.5"],
    ["distill.loss=rd", "distill.cached_topk=true", "distill.init_from_teacher=true", "ray.shard_mode=stream"],
    ["distill.loss=rrd", "distill.cached_topk=true", "student_train.hard_loss=sampled_softmax",
     "student_train.n_negatives=16"],
    ["distill.loss=mse", "student_train.hard_loss=sampled_softmax", "student_train.n_negatives=16"],
], ids=["kl-ddp2", "rd-cached-pca-stream", "rrd-cached-sampled", "mse-sampled"])
def test_student_distils_without_touching_the_teacher(trained, extra):
    cfg, data, teacher = trained
    cfg = load_config(None, [*TINY, f"runs_dir={cfg.runs_dir}", *extra])
    before = _weights_digest(teacher.checkpoint)
    out_dir = cfg.run_dir / f"student-{'-'.join(extra)[:40]}"
    outcome = train_model(cfg, "student", data, out_dir=out_dir, name=out_dir.name, teachers=[teacher.checkpoint])
    assert _weights_digest(teacher.checkpoint) == before
    assert all(np.isfinite(h["loss"]) for h in outcome.history)
    assert all("distill" in h for h in outcome.history)
    ckpt = load_checkpoint(out_dir)
    assert ckpt.meta["lineage"]["teachers"] == [str(teacher.checkpoint.resolve())]
    assert ckpt.model.n_items == data.n_items


def test_a_teacher_trained_on_another_split_of_the_catalog_is_refused(trained):
    """Same users and items, another split: the teacher trained on some of this split's validation and test pairs,
    so a student distilled from it would be picked and scored on what its teacher saw."""
    from kdray.errors import CheckpointError

    cfg, _, teacher = trained
    other_cfg = tiny(Path(cfg.runs_dir) / "other-split", "data.split_ratios=[0.7, 0.15, 0.15]")
    other = prepare_data(other_cfg)
    out_dir = other_cfg.run_dir / "student"
    with pytest.raises(CheckpointError, match="not in the data's training split"):
        train_model(other_cfg, "student", other, out_dir=out_dir, name="other-split", teachers=[teacher.checkpoint])
    assert not out_dir.exists()


def test_non_finite_loss_stops_with_a_clear_error_and_saves_nothing(trained):
    cfg, data, _ = trained
    bad = load_config(None, [*TINY, f"runs_dir={cfg.runs_dir}", "teacher_train.lr=1e30", "teacher_train.epochs=2"])
    from kdray.train.loop import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="lower teacher_train.lr"):
        train_model(bad, "teacher", data, out_dir=cfg.run_dir / "nan-teacher", name="nan-teacher")
    assert not (cfg.run_dir / "nan-teacher").exists()


def test_kdray_run_end_to_end(ray_cluster, tmp_path, capsys):
    # the default pipeline: a teacher search (2 trials here) before the ensemble
    ensemble = ["distill.n_teachers=2", "distill.init_from_teacher=true", "teacher_search.enabled=true",
                "teacher_search.num_samples=2"]
    assert main(["run", *TINY, *ensemble, f"runs_dir={tmp_path}", "name=e2e"]) == 0
    run = tmp_path / "e2e"
    summary = json.loads((run / "metrics.json").read_text())
    models = [r["model"] for r in summary["rows"]]
    assert models == ["teacher", "teacher-2", "teacher ensemble", "student (distilled)", "student (alone)"]
    lineage = load_checkpoint(run / "student").meta["lineage"]
    assert [Path(t).name for t in lineage["teachers"]] == ["teacher", "teacher-2"]
    alone = load_checkpoint(run / "student_alone")  # the control: no teacher, no distillation term in any epoch
    assert alone.meta["lineage"]["teachers"] == [] and alone.meta["lineage"]["distill"] is None
    assert alone.metrics["history"] and all("distill" not in h for h in alone.metrics["history"])
    assert all("distill" in h for h in load_checkpoint(run / "student").metrics["history"])
    for r in summary["rows"]:
        assert 0.0 <= r["test_ndcg@10"] <= 1.0 and r["latency_ms_per_1000_users"] > 0
    assert summary["rows"][3]["compression"] < 0.2
    # the ensemble row: both teachers ranked as one, as the student distils them
    joint = summary["rows"][2]
    assert joint["n_params"] == summary["rows"][0]["n_params"] + summary["rows"][1]["n_params"]
    assert joint["compression"] == 2.0 and "ranked as one" in joint["tuning"]
    assert 0.0 < joint["valid_ndcg@10"] <= 1.0  # the ensemble's own validation score, ranked as one
    assert (run / "report.md").read_text().startswith("# kdray run `e2e`")
    # a random split: validation and test items alike in popularity, recorded and not flagged
    assert abs(summary["data"]["popularity_shift"]["relative"]) < 0.1
    assert "popularity" not in (run / "report.md").read_text()
    assert (run / "config.yaml").exists() and (run / "data" / "train_by_user.parquet").exists()
    out = capsys.readouterr().out
    assert "| student (distilled) |" in out and "ndcg@10 (test)" in out
    # running the same command again reuses every finished stage instead of training again
    assert main(["run", *TINY, *ensemble, f"runs_dir={tmp_path}", "name=e2e"]) == 0
    assert capsys.readouterr().out.count("reusing") == 4


def test_cli_stages_one_at_a_time(ray_cluster, tmp_path, capsys):
    args = [*TINY, f"runs_dir={tmp_path}", "name=stages"]
    assert main(["data", *args]) == 0
    assert main(["teacher", *args]) == 0
    teacher = tmp_path / "stages" / "teacher"
    assert main(["distill", "--teacher", str(teacher), *args]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "stages" / "student"), *args]) == 0
    out = capsys.readouterr().out
    assert "test_ndcg@10:" in out and "student checkpoint:" in out
    # --output: the same metrics with what the model is and how it was trained, for generated tables
    record_path = tmp_path / "results" / "teacher.json"
    assert main(["eval", "--checkpoint", str(teacher), "--output", str(record_path), *args]) == 0
    record = json.loads(record_path.read_text())
    printed = dict(line.split(": ") for line in capsys.readouterr().out.splitlines() if line.startswith("test_"))
    assert {k: f"{v:.4f}" for k, v in record["test"].items() if k != "test_n_users"} == \
        {k: v for k, v in printed.items() if k != "test_n_users"}
    assert record["role"] == "teacher" and record["model"]["dim"] == 32 and record["train"]["epochs"] == 3
    assert record["trained"]["epochs_run"] == 3 and record["trained"]["best_epoch"] in (1, 2, 3)
    assert record["pairs"]["trained_on"] == record["pairs"]["train"] > 0 and record["pairs"]["valid"] > 0
    assert "test_graph_pairs" not in record  # an MF ranks from its weights alone; a LightGCN's record has it
    assert record["command"].startswith("kdray eval --checkpoint") and record["n_params"] > 0
    assert main(["eval", "--checkpoint", str(teacher), "--output", str(tmp_path), *args]) == 2
    assert f"--output {tmp_path} is a directory" in capsys.readouterr().err
    # several checkpoints rank as one ensemble, the way a student distils them: a model twice ranks as itself
    twice = tmp_path / "results" / "twice.json"
    assert main(["eval", "--checkpoint", str(teacher), "--checkpoint", str(teacher), "--output", str(twice),
                 *args]) == 0
    ensemble = json.loads(twice.read_text())
    assert ensemble["role"] == "ensemble" and [m["model"]["dim"] for m in ensemble["members"]] == [32, 32]
    assert ensemble["n_params"] == 2 * record["n_params"] and ensemble["weights"] is None
    assert ensemble["test"]["test_ndcg@10"] == pytest.approx(record["test"]["test_ndcg@10"])
    assert ensemble["test"]["test_recall@10"] == pytest.approx(record["test"]["test_recall@10"])
    # and on validation it scores what the training loop measured for its best epoch
    assert ensemble["valid"]["valid_ndcg@10"] == pytest.approx(load_checkpoint(teacher).metrics["valid_ndcg@10"])
    assert "valid" not in record  # a single model's validation score is its training's (record["trained"])
    capsys.readouterr()
    student = tmp_path / "stages" / "student"
    assert main(["eval", "--checkpoint", str(teacher), "--checkpoint", str(student), *args, "distill.n_teachers=3",
                 "distill.teacher_weights=[1,2,3]"]) == 2
    assert "distill.teacher_weights has 3 weights for 2 checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run", "data.source=ml-100k", "data.path=/nonexistent/ml-100k"], "/nonexistent/ml-100k"),
    (["run", "student.wings=3"], "unknown key student.wings"),
    (["run", "--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
    (["distill", "--teacher", "/nonexistent/teacher"], "teacher checkpoint /nonexistent/teacher does not exist"),
    (["eval", "--checkpoint", "/nonexistent/ckpt"], "checkpoint directory /nonexistent/ckpt does not exist"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    assert main([*argv, f"runs_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdray: error: ") and message in err
    assert "Traceback" not in err


def test_teacher_from_another_catalog_is_rejected(trained, tmp_path, capsys):
    _, _, teacher = trained
    args = [*TINY, "data.n_items=60", f"runs_dir={tmp_path}", "name=other"]
    assert main(["distill", "--teacher", str(teacher.checkpoint), *args]) == 2
    assert "trained on" in capsys.readouterr().err


def test_without_a_validation_split_every_model_keeps_its_last_epoch(ray_cluster, tmp_path, capsys):
    # e.g. a refit on all the training data for an epoch count chosen on an earlier run with validation
    no_valid = ["data.split_ratios=[0.9, 0, 0.1]", "teacher_train.patience=0", "student_train.patience=0"]
    assert main(["run", *TINY, *no_valid, f"runs_dir={tmp_path}", "name=novalid"]) == 0
    run = tmp_path / "novalid"
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["data"]["valid"] == 0
    epochs = {"teacher": 3, "student (distilled)": 2, "student (alone)": 2}
    for row in summary["rows"]:
        assert row["best_epoch"] == epochs[row["model"]] and row["valid_ndcg@10"] is None
        assert 0.0 <= row["test_ndcg@10"] <= 1.0
        history = load_checkpoint(Path(row["path"])).metrics["history"]
        assert [h["epoch"] for h in history] == list(range(1, epochs[row["model"]] + 1))
        assert not any("ndcg@10" in h or "best" in h for h in history)
    report = (run / "report.md").read_text()
    assert "no validation split, so each model is its last epoch" in report
    assert "Learning curves" not in report and not (run / "learning_curves.png").exists()  # no curve to draw
    out = capsys.readouterr().out
    assert "(no validation split)" in out and "val ndcg@10 nan" not in out
