"""The benchmark scripts that run without Ray: their smoke tests still run against kdray's current APIs, and the
ones that read real data sets ask for the data folder instead of guessing one."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_foldin_latency_smoke_test_trains_with_the_shared_epoch_function(tmp_path):
    out = tmp_path / "foldin.json"
    _script("foldin_latency").main(["--smoke-test", "--out", str(out)])
    assert json.loads(out.read_text())  # quality and latency rows were written


@pytest.mark.timeout(120)
def test_cached_topk_step_smoke_test_checks_both_paths_give_one_loss(tmp_path, capsys):
    out = tmp_path / "step.json"
    _script("cached_topk_step").main(["--smoke-test", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["losses"]) == {"rd", "rrd"}
    assert all(r["same_loss"] and len(r["seconds"]["columns"]) == 3 for r in result["losses"].values())
    assert "dense block" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_lightgcn_step_smoke_test_times_both_propagations_and_they_agree(tmp_path, capsys):
    out = tmp_path / "lgcn-step.json"
    script = _script("lightgcn_step")
    script.main(["--smoke-test", "--out", str(out)])
    result = json.loads(out.read_text())
    agreement = result["agreement"]
    assert agreement["loss_csr"] == pytest.approx(agreement["loss_coo"], rel=1e-6)
    assert agreement["max_grad"] > 0 and agreement["max_grad_difference"] <= 1e-6 * agreement["max_grad"]
    assert set(result["seconds_per_step"]) == {"csr", "coo"} and result["coo_over_csr"] > 0
    assert "median seconds per step" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:  # an MF teacher: named, no traceback
        script.main(["--smoke-test", "teacher.name=mf"])
    assert stop.value.code == 2 and "teacher.name=lightgcn" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_epoch_pilot_scores_each_epoch_on_validation_with_the_configs_model(tmp_path, capsys):
    out = tmp_path / "pilot.json"
    tiny = ["data.n_users=120", "data.n_items=80", "data.n_interactions=2000", "teacher.name=lightgcn",
            "teacher.dim=16", "teacher.cosine_temperature=0.1", "teacher_train.lr=0.05", "eval.ks=[5,10]", "eval.k=10"]
    _script("epoch_pilot").main(["--epochs", "3", "--out", str(out), *tiny])
    result = json.loads(out.read_text())
    assert result["teacher"]["cosine_temperature"] == 0.1 and result["teacher_train"]["lr"] == 0.05
    assert [r["epoch"] for r in result["epochs"]] == [1, 2, 3]
    assert all(0 <= r["valid_ndcg@10"] <= 1 and "valid_recall@5" in r for r in result["epochs"])
    assert not any(k.startswith("test") for r in result["epochs"] for k in r)  # the test split is never read
    assert result["epochs"][-1]["valid_ndcg@10"] > result["epochs"][0]["valid_ndcg@10"]  # it learns
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # one line per epoch
    assert _script("epoch_pilot").main(["teacher.cosine_temperature=0.1"]) == 2  # the default teacher is an MF
    assert "teacher.cosine_temperature: 0.1 is a lightgcn option" in capsys.readouterr().err


def test_recommended_popularity_masks_seen_items_and_summarises_training_popularity(tmp_path, capsys):
    from types import SimpleNamespace

    import torch

    from kdray.sparse import Csr

    script = _script("recommended_popularity")
    # 4 items with training popularity 5, 3, 1, 0; two users with test pairs (0 and 2), user 1 without
    popularity = np.array([5, 3, 1, 0])
    s = script.popularity_summary(np.array([0, 0, 1, 3]), popularity)
    # mean (5 + 5 + 3 + 0) / 4; the top 1% (and 10%) of 4 items is the single most popular one, item 0
    assert s == {"n": 4, "mean": 3.25, "median": 4.0, "share_top1pct": 0.5, "share_top10pct": 0.5}
    pairs = lambda rows, cols: Csr.from_pairs(np.array(rows), np.array(cols), 3, 4)  # noqa: E731
    data = SimpleNamespace(train=pairs([0, 2], [0, 1]), valid=pairs([0], [1]), test=pairs([0, 2], [3, 2]))

    class Fixed(torch.nn.Module):  # every user scores items 0 > 1 > 2 > 3
        def score_all(self, users):
            return torch.tensor([[4.0, 3.0, 2.0, 1.0]]).repeat(len(users), 1)

    top = script.recommended_items(Fixed(), data, k=2, batch_size=1)
    assert top.tolist() == [[2, 3], [0, 2]]  # user 0: 0 (train) and 1 (valid) masked; user 2: 1 (train) masked
    assert script.main(["--checkpoint", str(tmp_path / "nowhere"), "data.n_users=100", "data.n_items=50",
                        "data.n_interactions=1000"]) == 2
    assert f"checkpoint directory {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["foldin_latency", "replay", "serve_load", "dataset_counts", "split_popularity",
                                  "gowalla_subsample"])
def test_scripts_that_read_real_data_ask_for_its_folder(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        _script(name).main([])
    assert exit_.value.code == 2 and "--data" in capsys.readouterr().err


def test_split_popularity_counts_each_pair_by_its_items_training_popularity():
    from kdray.sparse import Csr

    popularity = np.array([50, 10, 5, 1, 1, 1, 1, 1, 1, 1])  # item 0 alone is the top 10% (and the top 1%)
    pairs = Csr.from_pairs(np.array([0, 0, 1, 1]), np.array([0, 2, 0, 9]), 2, 10)  # items 0, 2, 0, 9
    got = _script("split_popularity").popularity_of(pairs, popularity)
    assert got == {"pairs": 4, "mean": (50 + 5 + 50 + 1) / 4, "median": 27.5, "share_top1pct": 0.5,
                   "share_top10pct": 0.5}


def test_split_popularity_reports_what_kdrays_reports_flag(tmp_path, capsys):
    rng = np.random.default_rng(0)
    gowalla = tmp_path / "gowalla"  # the LightGCN layout, a long tail in train.txt, popular items in test.txt
    gowalla.mkdir()
    weights = 1.0 / np.arange(1, 101)
    train = {u: sorted(rng.choice(100, 20, replace=False, p=weights / weights.sum()).tolist()) for u in range(200)}
    test = {u: sorted(set(range(5)) - set(items))[:1] for u, items in train.items()}
    (gowalla / "train.txt").write_text("".join(f"{u} {' '.join(map(str, it))}\n" for u, it in train.items()))
    (gowalla / "test.txt").write_text("".join(f"{u} {' '.join(map(str, it))}\n" for u, it in test.items() if it))
    out = tmp_path / "popularity.json"
    assert _script("split_popularity").main(["--data-root", str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ml-100k   MISSING" in printed and "gowalla   test against valid: +" in printed
    r = json.loads(out.read_text())["datasets"]["gowalla"]
    assert r["flagged"] and r["shift"]["test_mean"] == pytest.approx(r["test"]["mean"])
    assert r["shift"]["valid_mean"] == pytest.approx(r["valid"]["mean"]) and "; flagged by kdray's" in printed


@pytest.mark.timeout(120)
def test_ensemble_mixture_smoke_test_checks_both_ways_agree(tmp_path, capsys):
    out = tmp_path / "mixture.json"
    _script("ensemble_mixture").main(["--smoke-test", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(s["teachers"], s["users"]) for s in result["settings"]] == [(2, 256), (2, 1000), (3, 256), (3, 1000)]
    assert all(s["max_abs_difference"] <= 1e-4 and len(s["seconds"]["stacked"]) == 2 for s in result["settings"])
    assert "one at a time" in capsys.readouterr().out


def test_fit_floor_counts_the_ray_processes_that_start_during_a_run_and_the_cpu_it_took():
    import subprocess

    bench = _script("fit_floor")
    measured = bench.Measured()

    def run() -> None:  # a process titled like a Ray actor, and some CPU work in this one
        proc = subprocess.Popen(["bash", "-c", 'exec -a "ray::FakeActor" sleep 1'])
        sum(i * i for i in range(3_000_000))
        proc.wait()

    seconds = measured(run)
    (record,) = measured.records
    assert record["seconds"] == seconds >= 1.0
    assert "ray::FakeActor" in record["processes"]  # (a Ray cluster of this session may start workers meanwhile)
    assert record["cpu_seconds"] > 0.05  # the loop above, at least
    assert measured(lambda: None) < 1.0 and "ray::FakeActor" not in measured.records[1]["processes"]


def test_history_graph_scores_a_lightgcn_both_ways_and_an_mf_the_same_twice(tmp_path, capsys):
    from types import SimpleNamespace

    from kdray.models import build_model
    from kdray.sparse import Csr

    script = _script("history_graph")
    rng = np.random.default_rng(0)

    def pairs(n):
        return Csr.from_pairs(rng.integers(0, 40, n), rng.integers(0, 30, n), 40, 30)

    data = SimpleNamespace(train=pairs(200), valid=pairs(60), test=pairs(80))
    lightgcn = build_model("lightgcn", n_users=40, n_items=30, dim=8, graph=data.train)
    on_union = build_model("lightgcn", n_users=40, n_items=30, dim=8, graph=Csr.union(data.train, data.valid))
    on_union.load_state_dict({**lightgcn.state_dict(), "graph_edges": on_union.graph_edges})
    both = script.both_graphs(lightgcn, data, k=5)
    again = script.both_graphs(on_union, data, k=5)  # already over train + valid: the same number both ways
    assert both["train + valid"] == again["training graph"] == again["train + valid"] != both["training graph"]
    mf = script.both_graphs(build_model("mf", n_users=40, n_items=30, dim=8), data, k=5)
    assert mf["training graph"] == mf["train + valid"]
    assert script.main(["--checkpoint", str(tmp_path / "nowhere"), "data.n_users=100", "data.n_items=50",
                        "data.n_interactions=1000"]) == 2
    assert f"checkpoint directory {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_gowalla_subsample_keeps_every_pair_of_the_drawn_users_from_both_files_once(tmp_path, capsys):
    script = _script("gowalla_subsample")
    data = tmp_path / "gowalla"
    data.mkdir()
    # users 0..5; user 1 has item 7 in both files, which the CSV must hold once
    (data / "train.txt").write_text("0 1 2\n1 3 7\n2 4\n3 5 6\n4 1\n5 2 3\n")
    (data / "test.txt").write_text("0 9\n1 7 8\n3 1\n")
    pairs = {0: {1, 2, 9}, 1: {3, 7, 8}, 2: {4}, 3: {5, 6, 1}, 4: {1}, 5: {2, 3}}
    out = tmp_path / "sub.csv"
    assert script.main(["--data", str(data), "--fraction", "0.5", "--seed", "3", "--out", str(out)]) == 0
    import pandas as pd

    sub = pd.read_csv(out)
    assert list(sub.columns) == ["user", "item"] and not sub.duplicated().any()
    drawn = list(dict.fromkeys(sub["user"]))
    assert len(drawn) == 3  # half of the six users
    assert {u: set(sub.loc[sub["user"] == u, "item"]) for u in drawn} == {u: pairs[u] for u in drawn}
    assert "3 users" in capsys.readouterr().out
    again = tmp_path / "again.csv"
    script.main(["--data", str(data), "--fraction", "0.5", "--seed", "3", "--out", str(again)])
    assert again.read_bytes() == out.read_bytes()  # the same seed, the same users
    with pytest.raises(SystemExit) as exit_:
        script.main(["--data", str(data), "--fraction", "1.5", "--out", str(out)])
    assert exit_.value.code == 2 and "--fraction must be in (0, 1]" in capsys.readouterr().err
