"""Incremental refresh (kdray update): reading new interactions, growing data and model, and one end-to-end refresh
rolled out to a live Serve application under load (the shared local cluster, 127.0.0.1)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from kdray.checkpoint import Vocab, load_checkpoint, save_checkpoint
from kdray.config import load_config, to_dict
from kdray.data.prepare import prepare
from kdray.errors import DataError
from kdray.layout import RunLayout
from kdray.models import build_model, model_from_config
from kdray.train.update import _teachers_for, grow_data, grow_model, read_interactions
from test_jobs import _load_script, captured  # noqa: F401  (the stubbed kdray.cli.main fixture)

TINY = ["data.n_users=60", "data.n_items=40", "data.n_interactions=900", "data.n_clusters=3", "student.dim=4",
        "teacher.dim=8", "distill.n_teachers=1", "student_train.batch_size=32", "student_train.lr=0.02",
        "eval.batch_size=64"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with prepared tiny data and its config (no trained model)."""
    root = tmp_path_factory.mktemp("update")
    cfg = load_config(None, [*TINY, f"runs_dir={root}", "name=tiny"])
    layout = RunLayout(cfg.run_dir)
    data = prepare(cfg.data, layout.data)
    layout.config.write_text(yaml.safe_dump(to_dict(cfg)))
    return cfg, layout, data


# ----------------------------------------------------------------------------------------------------------------
# Reading


def test_reads_parquet_and_csv_with_optional_timestamps(tmp_path):
    pq.write_table(pa.table({"user": [1, 2], "item": [10, 11], "timestamp": [5, 6]}), tmp_path / "a.parquet")
    (tmp_path / "b.csv").write_text("user,item\nu1,i9\n 7 ,i3\n")
    a, b = read_interactions(tmp_path / "a.parquet"), read_interactions(tmp_path / "b.csv")
    assert a["user"].tolist() == ["1", "2"] and a["item"].tolist() == ["10", "11"] and a["timestamp"].tolist() == [5, 6]
    assert b["user"].tolist() == ["u1", "7"] and b["timestamp"].isna().all()


@pytest.mark.parametrize("name, content, message", [
    ("extra.csv", "user,item,rating\n1,2,5\n", r"unexpected column\(s\) \['rating'\]"),
    ("missing.csv", "user,timestamp\n1,2\n", r"missing column\(s\) \['item'\]"),
    ("empty_id.csv", "user,item\n1,2\n3,\n", r"row 2, column 'item': empty id"),
    ("bad_time.csv", "user,item,timestamp\n1,2,100\n3,4,yesterday\n", r"row 2, column 'timestamp': 'yesterday'"),
    ("header_only.csv", "user,item\n", "no interactions"),
    ("data.json", "{}", "must be a .parquet or .csv"),
    ("broken.parquet", "not parquet", "cannot be read"),
])
def test_bad_interactions_files_name_the_file_row_and_column(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        read_interactions(path)
    assert str(path) in str(e.value)


def test_null_ids_in_parquet_name_the_row(tmp_path):
    pq.write_table(pa.table({"user": ["a", None], "item": ["x", "y"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"row 2, column 'user'"):
        read_interactions(tmp_path / "n.parquet")


# ----------------------------------------------------------------------------------------------------------------
# Growing


def test_vocabularies_grow_existing_ids_keep_theirs_and_splits_stay_disjoint(run, tmp_path):
    _, _, data = run
    u0, i0 = data.user_ids[0], data.item_ids[0]
    test_user = int(np.flatnonzero(data.test.row_lengths())[0])
    moved = (data.user_ids[test_user], data.item_ids[data.test.row(test_user)[0]])  # a test pair seen again
    rows = pd.DataFrame({"user": [u0, "new-u", "new-u", moved[0]], "item": ["new-i", i0, "new-i", moved[1]]})
    grown = grow_data(data, rows, "new.csv")
    assert (grown.n_users, grown.n_items) == (data.n_users + 1, data.n_items + 1)
    assert grown.user_ids[:-1].tolist() == data.user_ids.tolist() and grown.user_ids[-1] == "new-u"
    assert grown.item_ids[-1] == "new-i"
    assert grown.train.nnz == data.train.nnz + 4 and grown.test.nnz == data.test.nnz - 1
    assert set(grown.train.row(grown.n_users - 1)) == {0, grown.n_items - 1}
    for a, b in [("train", "valid"), ("train", "test"), ("valid", "test")]:
        x, y = getattr(grown, a), getattr(grown, b)
        assert not set(zip(x.rows_of(), x.indices)) & set(zip(y.rows_of(), y.indices)), (a, b)
    assert grown.meta["updates"][-1]["new_users"] == 1 and grown.meta["fingerprint"] != data.meta["fingerprint"]


def test_model_grows_old_rows_copied_new_rows_from_the_fresh_init(run):
    cfg, _, data = run
    torch.manual_seed(1)
    old = model_from_config(cfg.student, data)
    fresh = build_model("mf", n_users=data.n_users + 2, n_items=data.n_items + 3, dim=cfg.student.dim)
    new_rows = fresh.user_emb.weight[data.n_users:].detach().clone()
    grown = grow_model(old, fresh)
    assert torch.equal(grown.user_emb.weight[: data.n_users], old.user_emb.weight)
    assert torch.equal(grown.item_bias[: data.n_items], old.item_bias)
    assert torch.equal(grown.user_emb.weight[data.n_users:], new_rows)
    assert torch.equal(grown.item_bias[data.n_items:], torch.zeros(3))  # as training initialises biases


def test_teacher_guides_only_when_it_knows_every_id(run, tmp_path):
    cfg, layout, data = run
    assert _teachers_for(cfg, layout, data, grew=False)[0] == []  # no teacher checkpoint yet
    teacher = build_model("mf", n_users=data.n_users, n_items=data.n_items, dim=8)
    save_checkpoint(layout.teacher(0), teacher, role="teacher", config={},
                    vocab=Vocab(user_ids=data.user_ids, item_ids=data.item_ids, seen=data.train))
    paths, note = _teachers_for(cfg, layout, data, grew=False)
    assert paths == [layout.teacher(0)] and "distilled from" in note
    paths, note = _teachers_for(cfg, layout, data, grew=True)
    assert paths == [] and "cannot score" in note


# ----------------------------------------------------------------------------------------------------------------
# The command and the job script (no Ray)


def test_update_job_runs_kdray_update(captured, monkeypatch):  # noqa: F811
    job = _load_script("update", monkeypatch)
    assert job.main(["--run", "/shared/runs/ml", "--interactions", "/shared/new.parquet", "--rollout"]) == 0
    assert captured[-1] == ["update", "--address", "auto", "--run", "/shared/runs/ml", "--interactions",
                            "/shared/new.parquet", "--epochs", "3", "--rollout"]


def test_cli_update_bad_input_is_one_line_and_exit_2_before_ray(run, tmp_path, capsys):
    from kdray.cli import main

    _, layout, _ = run
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,extra\n1,2,3\n")
    assert main(["update", "--run", str(layout.root), "--interactions", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdray: error:") and "unexpected column(s) ['extra']" in err and "\n" not in err
    assert main(["update", "--run", str(tmp_path / "nope"), "--interactions", str(bad)]) == 2
    assert "run directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# End to end on Ray: train, serve, update with --rollout under load


@pytest.mark.ray
def test_update_grows_the_student_and_rolls_out_without_failing_a_request(ray_cluster, run, tmp_path):
    requests = pytest.importorskip("requests")
    from ray import serve

    from kdray.cli import main
    from kdray.config import replace
    from kdray.distill import without_distillation
    from kdray.serve.app import APP_NAME, serve_checkpoint
    from kdray.serve.predictor import checkpoint_version
    from kdray.train.driver import train_model
    from test_serve import _free_port

    cfg, layout, data = run
    port = _free_port()
    serving = [f"serve.port={port}", "serve.num_cpus=0.25", "serve.min_replicas=1", "serve.max_replicas=1",
               "serve.max_batch_size=4", "serve.max_ongoing_requests=8"]
    cfg = replace(without_distillation(cfg), **{"student_train.epochs": 1})
    train_model(cfg, "student", data, out_dir=layout.student, name="update-test-v1",
                storage_path=str(tmp_path / "ray"))
    new = tmp_path / "new.csv"
    new.write_text("user,item,timestamp\n" + "".join(f"fresh-user,{i},{t}\n" for t, i in
                                                     enumerate(data.item_ids[:5])) +
                   f"{data.user_ids[0]},brand-new-item,9\n")
    url = f"http://127.0.0.1:{port}/recommend"
    log: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        for n in range(20_000):  # bounded
            if stop.is_set():
                return
            body = {"user_id": "fresh-user", "k": 3, "history": [data.item_ids[1]]} if n % 2 else \
                {"user_id": data.user_ids[n % 7], "k": 3}
            try:
                r = session.post(url, json=body, timeout=30)
                log.append((r.status_code, r.json()["model"]["version"] if r.ok else r.text[:200]))
            except requests.RequestException as e:
                log.append((0, type(e).__name__))

    try:
        serve_checkpoint(layout.student, load_config(layout.config, serving).serve, blocking=False)
        threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        assert main(["update", "--run", str(layout.root), "--interactions", str(new), "--epochs", "1",
                     "--rollout", *serving]) == 0
        v2 = layout.version(2) / "student"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not log or log[-1][1] != checkpoint_version(v2)):
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(timeout=35)
        failed = [entry for entry in log if entry[0] != 200]
        versions = [v for _, v in log]
        assert log and not failed, failed[:3]
        assert versions[0] == checkpoint_version(layout.student) and versions[-1] == checkpoint_version(v2)

        ckpt = load_checkpoint(v2)
        assert (ckpt.model.n_users, ckpt.model.n_items) == (data.n_users + 1, data.n_items + 1)
        assert ckpt.vocab.user_ids[-1] == "fresh-user" and ckpt.vocab.item_ids[-1] == "brand-new-item"
        record = json.loads((layout.version(2) / "update.json").read_text())
        assert record["data"]["new_users"] == 1 and record["data"]["new_pairs"] == 6
        assert "cannot score" in record["teacher"] and record["test"]["test_n_users"] > 0
        assert record["rollout_seconds"] > 0
        r = requests.post(url, json={"user_id": "fresh-user", "k": 3}, timeout=30).json()
        assert not r["cold_start"]  # a known user of version 2
        serve.delete(APP_NAME)
    finally:
        stop.set()
        serve.shutdown()
