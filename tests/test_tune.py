"""kdray.tune: the search space and its checks, the winner rule, and, on the shared Ray cluster, one small search that
is interrupted (SIGINT to the real ``kdray tune``), resumed in this process, stopped early by ASHA, and whose
exported winner loads and scores.

The search: tiny data, one teacher, a 4-d student, 3 epochs; ``student_train.lr`` is a grid of a good and a useless
rate, one trial at a time, so in the control arm ASHA sees the good trial first and must stop the other at epoch 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdray.checkpoint import load_checkpoint
from kdray.cli import main
from kdray.config import load_config
from kdray.errors import ConfigError
from kdray.tune.report import choose_winner
from kdray.tune.search import run_search
from kdray.tune.space import ARMS, arm_keys, arm_trials, base_point, resolve_space, trial_config, validate_space

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.n_users=120", "data.n_items=80", "data.n_interactions=3000", "data.n_clusters=4",
    "teacher.name=mf", "teacher.dim=32", "teacher.hidden=[]", "student.dim=4",
    "teacher_train.epochs=3", "student_train.epochs=3", "teacher_train.lr=0.02", "student_train.lr=0.02",
    "teacher_train.batch_size=32", "student_train.batch_size=32", "eval.batch_size=64", "distill.n_teachers=1",
    "distill.init_from_teacher=false", "distill.alpha=0.5", "teacher_search.enabled=false",
]
SEARCH = {"tune": {
    "num_samples": 1, "max_concurrent_trials": 1, "max_params_ratio": 0.5,
    "space": {"student_train.lr": {"grid": [0.02, 1e-5]}, "distill.alpha": {"uniform": [0.3, 0.7]},
              "distill.loss": {"choice": ["rd"]}, "student.dim": {"choice": [4]}, "distill.temperature": None,
              "distill.init_from_teacher": None, "student_train.weight_decay": None,
              "student_train.batch_size": None},
}}
METRIC = "ndcg@10"


def _tiny(*extra: str):
    return load_config(None, [*TINY, *extra])


# ----------------------------------------------------------------------------------------------------------------
# The space, the budget of each arm, the winner rule (no Ray).


@pytest.mark.parametrize("config", [None, ROOT / "configs" / "tune-example.yaml"], ids=["defaults", "tune-example"])
def test_shipped_spaces_validate_and_both_arms_train_as_many_students(config):
    cfg = load_config(config)
    space = resolve_space(cfg)
    validate_space(cfg, space)
    assert arm_keys(space, "alone") == [k for k in space if not k.startswith("distill.")]
    assert arm_trials(cfg, space, "distilled") == arm_trials(cfg, space, "alone") >= 8


def test_yaml_space_overrides_merge_over_the_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"tune": {"num_samples": 2, "space": {
        "distill.loss": {"grid": ["kl", "rd", "mse"]}, "student.dim": {"grid": [4, 8]},
        "distill.temperature": None, "student_train.lr": {"choice": [0.01]}}}}))
    cfg = load_config(f)
    space = resolve_space(cfg)
    validate_space(cfg, space)
    assert "distill.temperature" not in space and space["student_train.lr"] == {"choice": [0.01]}
    assert "distill.alpha" in space  # a default dimension the YAML did not touch
    # the control has no distillation grid: it runs 3x the samples, so both arms train 2 x 3 x 2 = 12 students
    assert arm_trials(cfg, space, "distilled") == arm_trials(cfg, space, "alone") == 12


def test_trial_config_gives_the_control_no_teacher():
    cfg = _tiny("distill.init_from_teacher=true")
    alone = trial_config(cfg, {"student.dim": np.int64(8), "student_train.lr": np.float64(0.01)}, "alone")
    assert (alone.distill.loss, alone.distill.alpha, alone.distill.init_from_teacher) == ("none", 0.0, False)
    assert alone.student.dim == 8 and type(alone.student.dim) is int
    distilled = trial_config(cfg, {"distill.loss": "kl", "distill.alpha": 0.3}, "distilled")
    assert (distilled.distill.loss, distilled.distill.alpha, distilled.distill.init_from_teacher) == ("kl", 0.3, True)


def test_each_arm_starts_from_the_configured_settings_when_they_lie_in_its_space():
    cfg = load_config(None)  # the defaults: what `kdray run` trains
    space = resolve_space(cfg)
    first = base_point(cfg, space, "distilled")
    assert first == {"distill.temperature": 1.0, "distill.alpha": 0.7, "distill.loss": "rrd",
                     "distill.init_from_teacher": True, "student.dim": 16, "student_train.lr": 0.01,
                     "student_train.weight_decay": 0.0, "student_train.batch_size": 256}
    assert base_point(cfg, space, "alone") == {k: v for k, v in first.items() if not k.startswith("distill.")}
    outside = load_config(None, ["student.dim=32"])
    assert base_point(outside, resolve_space(outside), "alone") is None
    grid = load_config(None, ['tune.space={"student.dim": {"grid": [8, 16]}}'])
    assert base_point(grid, resolve_space(grid), "distilled") is None


def test_winner_rule_completed_within_budget_best_validation_then_smaller():
    def row(trial, valid, n, ratio, checkpoint="ckpt"):
        return {"trial": trial, f"valid_{METRIC}": valid, "n_params": n, "params_ratio": ratio,
                "checkpoint": checkpoint}

    rows = [row("stopped", 0.9, 10, 0.01, checkpoint=""), row("too-big", 0.8, 500, 0.5),
            row("big", 0.3, 60, 0.06), row("small", 0.3, 40, 0.04), row("worse", 0.2, 10, 0.01),
            row("nan", float("nan"), 10, 0.01)]
    assert choose_winner(rows, METRIC, 0.1)["trial"] == "small"
    assert choose_winner(rows, METRIC, 1.0)["trial"] == "too-big"
    assert choose_winner(rows[:1], METRIC, 1.0) is None


@pytest.mark.parametrize("space, message", [
    ({k: None for k in resolve_space(load_config(None))}, "the search space is empty"),
    ({"student.wings": {"choice": [1, 2]}}, "unknown key student.wings"),
    ({"teacher.dim": {"choice": [64]}}, "tune.space.teacher.dim: not a searchable parameter"),
    ({"distill.n_teachers": {"choice": [1, 2]}}, "tune.space.distill.n_teachers: not a searchable parameter"),
    ({"student.dim": {"normal": [8, 2]}}, "tune.space.student.dim: expected one of choice, grid"),
    ({"student.dim": {"choice": []}}, "tune.space.student.dim: choice needs a non-empty list"),
    ({"student.dim": [8, 16]}, "tune.space.student.dim: expected one of choice"),
    ({"distill.alpha": {"uniform": [0.9, 0.1]}}, "uniform needs [low, high] with low < high"),
    ({"student_train.lr": {"loguniform": [0, 0.1]}}, "loguniform needs a positive lower bound"),
    ({"distill.alpha": {"uniform": [0.5, 1.5]}}, "tune.space.distill.alpha: value 1.5 is not valid"),
    ({"student.dim": {"choice": [8, "big"]}}, "tune.space.student.dim: value 'big' is not valid"),
    ({"distill.loss": {"choice": ["kl", "none"]}}, "'none' is the control arm"),
], ids=["empty", "unknown", "teacher", "n-teachers", "kind", "no-values", "not-a-domain", "low-high", "log-zero",
        "alpha-range", "type", "loss-none"])
def test_bad_space_is_refused_naming_the_key(space, message):
    cfg = _tiny(f"tune.space={json.dumps(space)}")
    with pytest.raises(ConfigError) as e:
        validate_space(cfg, resolve_space(cfg))
    assert message in str(e.value)


def test_model_based_searchers_are_an_optional_extra_and_take_no_grid():
    cfg = _tiny("tune.searcher=optuna", 'tune.space={"student.dim": {"grid": [4, 8]}}')
    with pytest.raises(ConfigError, match="grid dimensions need tune.searcher=random"):
        validate_space(cfg, resolve_space(cfg))
    try:
        import optuna  # noqa: F401
    except ImportError:
        from kdray.tune.search import _searcher

        with pytest.raises(ConfigError, match=r"pip install kdray\[optuna\]"):
            _searcher(_tiny("tune.searcher=optuna"), METRIC)


# ----------------------------------------------------------------------------------------------------------------
# Bad input through `kdray tune`: one clear line, exit 2, and no teacher or trial ever started.


def _nothing_started(run: Path) -> bool:
    return not (run / "teacher").exists() and not (run / "tune" / "ray").exists()


@pytest.mark.ray
@pytest.mark.parametrize("extra, message", [
    (['tune.space={"student.wings": {"choice": [1]}}'], "unknown key student.wings"),
    (["ray.cpus_per_worker=3"], "ray.cpus_per_worker=3.0: no node of this cluster can host one training worker"),
    (["ray.num_workers=3"], "ray.num_workers=3 x {'CPU': 1.0} per worker needs {'CPU': 3.0}"),
    (["ray.use_gpu=true"], "with a GPU per worker: no node of this cluster can host"),
    (["tune.max_params_ratio=0.01"], "the smallest student in the search (student.dim=4: 880 parameters)"),
    (['tune.space={"student_train.lr": {"grid": [0.01]}}', "tune.searcher=hyperopt"], "grid dimensions need"),
], ids=["unknown-key", "cpus-per-worker", "num-workers", "gpu", "size-budget", "searcher-grid"])
def test_kdray_tune_refuses_bad_input_before_anything_starts(ray_cluster, tmp_path, capsys, extra, message):
    if "gpu" in message and ray_cluster.cluster_resources().get("GPU"):
        pytest.skip("this cluster has a GPU")
    assert main(["tune", *TINY, f"runs_dir={tmp_path}", "name=bad", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdray: error: ") and message in err and "Traceback" not in err
    assert _nothing_started(tmp_path / "bad")


# ----------------------------------------------------------------------------------------------------------------
# One search: interrupted, resumed, stopped early by ASHA, exported.


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _interrupted_cli_search(config: Path, runs: Path, log: Path) -> dict[str, dict]:
    """Runs `kdray tune` in a subprocess (its own local Ray), sends SIGINT (Ctrl+C) once the first trial has
    exported, and returns what that trial left: its weights' hash and its Ray Train checkpoints."""
    exports = runs / "search" / "tune" / "trials" / "distilled"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kdray.cli", "tune", "--config", str(config), *TINY,
                                 f"runs_dir={runs}", "name=search"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT, start_new_session=True)
        try:
            deadline = time.monotonic() + 360
            while not list(exports.glob("*/model.pt")):
                assert proc.poll() is None, f"kdray tune ended before its first trial did:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no trial finished in 6 minutes"
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 2
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: the driver and its Ray
    assert "kdray: error: the distilled search stopped after" in log.read_text()
    trials = runs / "search" / "tune" / "ray" / "search-distilled-trials"
    return {p.parent.name: {"weights": _sha(p), "train": sorted(x.name for x in (trials / p.parent.name).iterdir())}
            for p in exports.glob("*/model.pt")}


@pytest.fixture(scope="module")
def search(ray_cluster, tmp_path_factory):
    runs = tmp_path_factory.mktemp("tune")
    config = runs / "search.yaml"
    config.write_text(yaml.safe_dump(SEARCH))
    finished = _interrupted_cli_search(config, runs, runs / "interrupted.log")
    lines: list[str] = []
    result = run_search(load_config(config, [*TINY, f"runs_dir={runs}", "name=search"]), resume=True,
                        log=lines.append)
    return {"result": result, "finished": finished, "run": runs / "search", "log": lines, "config": config,
            "runs": runs}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_an_interrupted_search_resumes_without_training_finished_trials_again(search):
    assert any("distilled: resuming the search" in line for line in search["log"])
    assert search["finished"]  # at least one trial had finished before the interrupt
    trials = search["run"] / "tune" / "ray" / "search-distilled-trials"
    exports = search["run"] / "tune" / "trials" / "distilled"
    for trial, before in search["finished"].items():
        # no new epoch checkpoint in its Ray Train run, the same weights exported
        assert sorted(x.name for x in (trials / trial).iterdir()) == before["train"]
        assert _sha(exports / trial / "model.pt") == before["weights"]
    rows = search["result"].leaderboard
    assert sorted((r["arm"], r["student_train.lr"]) for r in rows) == sorted(
        (arm, lr) for arm in ARMS for lr in (0.02, 1e-5))


@pytest.mark.ray
def test_asha_stops_the_lagging_trial_and_frees_its_workers(search, ray_cluster):
    rows = {(r["arm"], r["student_train.lr"]): r for r in search["result"].leaderboard}
    stopped = rows[("alone", 1e-5)]  # the control arm ran fresh: ASHA saw the good trial first
    assert stopped["status"] == "stopped early" and stopped["epochs"] == 1 and not stopped["checkpoint"]
    assert (search["run"] / "tune" / "trials" / "alone" / f"{stopped['trial']}.stopped").is_file()
    assert rows[("alone", 0.02)]["status"] == "completed" and rows[("alone", 0.02)]["epochs"] == 3
    summary = json.loads((search["run"] / "tune" / "summary.json").read_text())
    assert summary["stopped_early"]["alone"] == 1 and summary["errored"] == {"distilled": 0, "alone": 0}
    # the stop went through Ray Train's own shutdown: no placement group is left holding CPUs
    from ray.util import placement_group_table

    assert {pg["state"] for pg in placement_group_table().values()} <= {"REMOVED"}


@pytest.mark.ray
def test_leaderboard_report_and_plot_put_each_arm_side_by_side(search):
    out = search["run"] / "tune"
    import pandas as pd

    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board) == 4 and set(board["arm"]) == set(ARMS)
    for column in ("status", "epochs", f"valid_{METRIC}", f"test_{METRIC}", "n_params", "params_ratio",
                   "latency_ms_per_1000_users", "distill.alpha", "student_train.lr", "student.dim"):
        assert column in board.columns
    assert board[f"valid_{METRIC}"].is_monotonic_decreasing
    tested = board.dropna(subset=[f"test_{METRIC}"])
    assert sorted(tested["arm"]) == sorted(ARMS)  # only each arm's best saw the test split
    result = search["result"]
    for arm in ARMS:
        best = result.best[arm]
        assert best["status"] == "completed" and 0.0 < best[f"test_{METRIC}"] <= 1.0
    report = (out / "report.md").read_text()
    assert report.startswith("# kdray search `search`") and "| best distilled" in report and "| best alone" in report
    assert "| teacher |" in report and "stopped early by ASHA" in report
    assert (out / "leaderboard.md").read_text().startswith("| arm")
    import matplotlib.image

    assert matplotlib.image.imread(out / "pareto.png").shape[0] > 300


@pytest.mark.ray
def test_the_exported_winner_loads_and_scores(search):
    from kdray.evaluate import evaluate_checkpoint
    from kdray.pipeline import prepare_data
    from kdray.serve.predictor import Recommender

    result = search["result"]
    best = result.best_dir
    assert best == search["run"] / "best"
    ckpt = load_checkpoint(best)
    assert ckpt.meta["role"] == "student"
    assert ckpt.metrics["tune_trial"] == result.winner["trial"] and ckpt.metrics["tune_arm"] == result.winner["arm"]
    assert ckpt.metrics[f"valid_{METRIC}"] == pytest.approx(result.winner[f"valid_{METRIC}"])
    rec = Recommender.from_checkpoint(best)
    user = ckpt.vocab.user_ids[0]
    top = rec.recommend([user], k=5)[0]
    seen = {ckpt.vocab.item_ids[i] for i in ckpt.vocab.seen.row(0)}
    assert len(top.item_ids) == 5 and not seen & set(top.item_ids) and not top.cold_start
    cfg = load_config(search["config"], [*TINY, f"runs_dir={search['runs']}", "name=search"])
    test = evaluate_checkpoint(best, prepare_data(cfg), ks=(10,), write=False)
    assert test[f"test_{METRIC}"] == pytest.approx(result.winner[f"test_{METRIC}"])


@pytest.mark.ray
def test_a_finished_search_is_not_overwritten_and_resumes_only_as_itself(search, capsys):
    args = ["--config", str(search["config"]), *TINY, f"runs_dir={search['runs']}", "name=search"]
    assert main(["tune", *args]) == 2
    assert "a search already exists" in capsys.readouterr().err
    assert main(["tune", "--resume", *args, 'tune.space={"student.dim": {"choice": [8]}}']) == 2
    err = capsys.readouterr().err
    assert "was started with other settings" in err and "student.dim" in err
