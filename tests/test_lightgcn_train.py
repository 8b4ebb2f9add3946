"""Integration: a LightGCN teacher through ``kdray teacher`` on Ray Train with two DDP workers (the training graph
built once on the driver and shipped in the initial state), then an MF student distilled from it with the new
losses, starting from the teacher's propagated vectors (PCA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdray.checkpoint import load_checkpoint
from kdray.cli import main
from kdray.config import load_config
from kdray.models import LightGCN
from kdray.models.lightgcn import graph_edges
from kdray.pipeline import prepare_data
from kdray.train.driver import train_model

pytestmark = pytest.mark.ray

TINY = [
    "data.n_users=120", "data.n_items=80", "data.n_interactions=3000", "data.n_clusters=4",
    "teacher.name=lightgcn", "teacher.dim=32", "student.dim=4",
    "teacher_train.epochs=3", "student_train.epochs=2", "teacher_train.lr=0.02", "student_train.lr=0.02",
    "teacher_train.batch_size=32", "student_train.batch_size=32", "eval.batch_size=64", "distill.n_teachers=1",
    "distill.alpha=0.5",
    "teacher_search.enabled=false",  # one LightGCN under DDP is under test; the teacher search has its own tests
]


@pytest.fixture(scope="module")
def teacher(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lightgcn")
    args = [*TINY, f"runs_dir={tmp}", "name=lgcn", "ray.num_workers=2", "ray.cpus_per_worker=0.5"]
    assert main(["teacher", *args]) == 0
    cfg = load_config(None, args)
    return cfg, prepare_data(cfg), cfg.run_dir / "teacher"


def test_lightgcn_teacher_trains_under_ddp_and_its_checkpoint_carries_the_graph(teacher):
    cfg, data, path = teacher
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt.model, LightGCN) and ckpt.args["n_layers"] == 3
    assert torch.equal(ckpt.model.graph_edges, graph_edges(data.train, data.n_users, data.n_items))
    history = ckpt.metrics["history"]
    assert len(history) == cfg.teacher_train.epochs and history[-1]["loss"] < history[0]["loss"]
    assert all(np.isfinite(h["loss"]) for h in history)
    assert ckpt.metrics["n_params"] == 32 * (data.n_users + data.n_items)


@pytest.mark.parametrize("loss", ["rrd", "listwise"])
def test_mf_student_distils_from_the_lightgcn_teacher(teacher, loss):
    cfg, data, path = teacher
    cfg = load_config(None, [*TINY, f"runs_dir={cfg.runs_dir}", "name=lgcn", f"distill.loss={loss}",
                             "distill.temperature=2", "distill.init_from_teacher=true"])
    out_dir = cfg.run_dir / f"student-{loss}"
    outcome = train_model(cfg, "student", data, out_dir=out_dir, name=out_dir.name, teachers=[path])
    assert all(np.isfinite(h["loss"]) and "distill" in h for h in outcome.history)
    student = load_checkpoint(out_dir)
    assert student.args["name"] == "mf" and Path(student.meta["lineage"]["teachers"][0]) == path.resolve()
