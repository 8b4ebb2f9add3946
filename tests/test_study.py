"""kdray study (the equal-budget protocol of issue 11): the arithmetic of its verdict against hand-computed values,
the report script on a hand-written result, the study's config checks, and one tiny study end to end on the shared
Ray cluster (3 arms x 1 trial, 2 seeds), then ``--resume`` on the finished study, which must train nothing, and a
study of another student size, which must reuse the tuned teacher.

The teacher search of ``kdray run`` is the same teacher arm (kdray.tune.teacher); its notes are tested here too.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from kdray.cli import main
from kdray.config import load_config
from kdray.tune.study import compare, mean_std, study_config, study_spaces, verdict
from kdray.tune.teacher import teacher_note

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.n_users=120", "data.n_items=80", "data.n_interactions=3000", "data.n_clusters=4",
    "teacher.name=mf", "teacher.dim=32", "teacher.hidden=[]", "student.dim=4",
    "teacher_train.batch_size=32", "student_train.batch_size=32", "eval.batch_size=64",
    "distill.init_from_teacher=false", "distill.alpha=0.5",
    "study.num_samples=1", "study.epochs=2", "study.patience=0", "tune.max_concurrent_trials=2",
    'study.space={"lr": {"choice": [0.02, 0.05]}, "weight_decay": null, "embedding_l2": null, "batch_size": null}',
    'study.distill_space={"distill.alpha": {"choice": [0.5]}, "distill.init_from_teacher": null}',
]


# ----------------------------------------------------------------------------------------------------------------
# The verdict's arithmetic.


def test_compare_matches_hand_computed_values():
    # teacher mean 0.30; alone 0.20, 0.22, 0.24 -> mean 0.22, std 0.02; distilled 0.26, 0.27, 0.28 -> 0.27, std 0.01
    c = compare([0.29, 0.30, 0.31], [0.20, 0.22, 0.24], [0.26, 0.27, 0.28])
    assert c["mean"] == pytest.approx({"teacher": 0.30, "alone": 0.22, "distilled": 0.27})
    assert c["std"]["alone"] == pytest.approx(0.02) and c["std"]["distilled"] == pytest.approx(0.01)
    assert c["gain"] == pytest.approx(0.05) and c["gap"] == pytest.approx(0.08)
    assert c["gap_recovered"] == pytest.approx(0.625)  # 0.05 / 0.08
    assert c["threshold_2x_std"] == pytest.approx(0.04) and c["significant"]  # 0.05 > 2 x max(0.02, 0.01)


def test_a_gain_within_twice_the_seed_std_is_not_significant_and_no_gap_is_said_so():
    c = compare([0.20, 0.20, 0.20], [0.20, 0.25, 0.30], [0.26, 0.26, 0.26])  # alone std 0.05: threshold 0.10
    assert c["gain"] == pytest.approx(0.01) and not c["significant"]
    assert c["gap_recovered"] is None  # the teacher (0.20) is below the student alone (0.25): no gap to recover
    worse = compare([0.3, 0.3], [0.2, 0.2], [0.19, 0.19])  # zero spread: any positive gain would count; this loses
    assert worse["gain"] == pytest.approx(-0.01) and not worse["significant"]


def test_one_seed_has_no_spread_and_never_claims_significance():
    assert mean_std([0.5])[0] == 0.5 and math.isnan(mean_std([0.5])[1])
    assert not compare([0.4], [0.2], [0.3])["significant"]
    import statistics

    values = [0.1, 0.4, 0.35, 0.2]
    assert mean_std(values) == pytest.approx((statistics.fmean(values), statistics.stdev(values)))


def test_teacher_note_only_when_no_teacher_beats_the_student_alone():
    assert teacher_note("ndcg@10", [0.30, 0.25], 0.28) is None
    note = teacher_note("ndcg@10", [0.22, 0.222], 0.241)
    assert "no better than the student alone" in note and "0.2220" in note and "0.2410" in note
    assert teacher_note("ndcg@10", [0.24], 0.24) is not None  # equal is not better


def test_the_verdict_says_when_validation_and_test_differ_in_item_popularity():
    r = _result(8, 400, [0.20, 0.22, 0.24], [0.26, 0.27, 0.28])
    r.update(summary=compare(*r["arms"].values()), valid={"winners": {"teacher": 0.30, "alone": 0.20}})
    assert not any("popularity" in line for line in verdict(r))  # a result written before the field existed
    r["popularity_shift"] = {"valid_mean": 67.3, "test_mean": 83.0, "relative": 0.233, "z": 40.0}
    assert "Validation and test differ in item popularity" in verdict(r)[-1] and "**" not in verdict(r)[-1]
    r["popularity_shift"] = {"valid_mean": 134.8, "test_mean": 133.7, "relative": -0.008, "z": -0.9}
    assert not any("popularity" in line for line in verdict(r))


# ----------------------------------------------------------------------------------------------------------------
# The study's config: the same space for every arm, mistakes named before anything starts.


def test_every_arm_searches_the_same_training_space_over_its_own_section():
    cfg = study_config(load_config(None))
    spaces = study_spaces(cfg)
    strip = {arm: {k.split(".", 1)[1]: v for k, v in s.items() if not k.startswith("distill.")}
             for arm, s in spaces.items()}
    assert strip["teacher"] == strip["alone"] == strip["distilled"]
    assert set(strip["teacher"]) == {"lr", "weight_decay", "embedding_l2", "batch_size"}
    assert all(k.startswith("teacher_train.") for k in spaces["teacher"])
    assert {k for k in spaces["distilled"] if k.startswith("distill.")} == {"distill.alpha",
                                                                         "distill.init_from_teacher"}
    assert cfg.teacher_train.epochs == cfg.student_train.epochs == cfg.study.epochs
    assert cfg.distill.n_teachers == 1 and cfg.name == "study-synthetic-d16"
    assert cfg.study.seeds == (0, 1, 2)  # every winner is retrained with three seeds unless told otherwise


def test_asha_stops_no_study_trial_before_the_grace_period_half_the_epochs_by_default():
    assert load_config(None).study.epochs == 100 and study_config(load_config(None)).tune.grace_period == 50
    assert study_config(load_config(None, ["study.epochs=13"])).tune.grace_period == 6
    assert study_config(load_config(None, ["study.epochs=1"])).tune.grace_period == 1
    assert study_config(load_config(None, ["tune.grace_period=5"])).tune.grace_period == 5
    assert study_config(load_config(None, ["tune.grace_period=30", "study.epochs=12"])).tune.grace_period == 12


@pytest.mark.parametrize("extra, message", [
    (['study.space={"epochs": {"choice": [5]}}'], "study.space.epochs: not a searchable training setting"),
    (['study.distill_space={"student.dim": {"choice": [8]}}'], "study.distill_space.student.dim: not a distillation"),
    (['study.distill_space={"distill.loss": {"grid": ["kl", "rd"]}}'], "same budget for every arm"),
    (['study.space={"lr": {"loguniform": [0, 1]}}'], "loguniform needs a positive lower bound"),
    (["distill.loss=none", "distill.alpha=0"], "distill.loss: 'none' leaves the study's distilled arm"),
    (["study.seeds=[1, 1]"], "study.seeds: [1, 1] must be distinct"),
    (["study.losses=[rrd]"], "study.losses: 'rrd' is distill.loss, the main distilled arm"),
    (["study.losses=[none]"], "study.losses: ['none'] must be distinct distillation losses, not 'none'"),
    (["study.losses=[bogus]"], "study.losses"),
], ids=["epochs", "not-distill", "grid", "bad-domain", "no-loss", "seeds", "main-loss", "none-loss", "unknown-loss"])
def test_bad_study_settings_are_refused_naming_the_key(extra, message, capsys, tmp_path):
    assert main(["study", *extra, f"runs_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


# ----------------------------------------------------------------------------------------------------------------
# The report script on a hand-written result.


def _load_report_script():
    spec = importlib.util.spec_from_file_location("study_report", ROOT / "benchmarks" / "study_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_report"] = module
    spec.loader.exec_module(module)
    return module


def _result(dim: int, student_params: int, alone: list[float], distilled: list[float]) -> dict:
    return {"dataset": "toy", "metric": "test_ndcg@10", "student_dim": dim,
            "params": {"teacher": 10_000, "student": student_params},
            "arms": {"teacher": [0.30, 0.30, 0.30], "alone": alone, "distilled": distilled},
            "budget": {"trials": {"teacher": 8, "alone": 8, "distilled": 8},
                       "scheduler": {"name": "ASHA", "grace_period": dim * 5}},
            "winners": {}, "teacher_beats_alone_on_valid": dim != 8, "command": f"kdray study student.dim={dim}"}


def _write_results(tmp_path: Path, *studies: dict) -> Path:
    """A results folder holding each study as ``toy-d<dim>.json``, as kdray study writes them."""
    results = tmp_path / "results"
    results.mkdir()
    for r in studies:
        (results / f"toy-d{r['student_dim']}.json").write_text(json.dumps(r))
    return results


def test_report_script_writes_the_tables_between_the_markers_and_the_frontier(tmp_path):
    report = _load_report_script()
    d4 = _result(4, 200, [0.10, 0.10, 0.10], [0.10, 0.11, 0.12])
    d4["command"] = "kdray study data.path=/home/me/data/ml-100k student.dim=4"
    results = _write_results(tmp_path, _result(8, 400, [0.20, 0.22, 0.24], [0.26, 0.27, 0.28]), d4)
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text(f"# before\n\n{report.BEGIN}\nold table\n{report.END}\n\n## after\n")
    assert report.main(["--results", str(results), "--benchmarks", str(bench)]) == 0
    text = bench.read_text()
    assert text.startswith("# before\n") and text.endswith("## after\n") and "old table" not in text
    assert text.count(report.BEGIN) == text.count(report.END) == 1
    rows = [line for line in text.splitlines() if line.startswith(("| 4 |", "| 8 |"))]
    assert [r.split(" | ")[0] for r in rows] == ["| 4", "| 8"]  # smallest student first
    # d8: gain 0.05, gap 0.08 -> 62.5%, 0.05 > 2 x 0.02: yes; the teacher did not beat it on validation
    assert "| 0.2200 ± 0.0200 | 0.2700 ± 0.0100 | rd | +0.0500 | 62.5% | yes | **no** | 3 | 8 | 40 |" in rows[1]
    # d4: gain 0.01 within 2 x 0.01
    assert "| +0.0100 | 5.0% | no | yes |" in rows[0] and "200 / 10,000 (2.0%)" in rows[0]
    assert "| distilled-rd d=8 | 400 | 0.2700 ± 0.0100 |" in text and "kdray study student.dim=8" in text
    assert "The compression frontier (every point tuned with the same budget):" in text  # 8 trials at both sizes
    # both studies have the same teacher, seed for seed (a shared teacher arm): one point, naming both studies
    assert "| teacher (studies d=4, 8) | 10,000 |" in text and text.count("| teacher (") == 1
    # the machine's data folder is not printed
    assert "    kdray study data.path=DATA/ml-100k student.dim=4" in text and "/home/me" not in text
    import matplotlib.image

    assert matplotlib.image.imread(results / "toy-frontier.png").shape[0] > 300
    again = bench.read_text()
    assert report.main(["--results", str(results), "--benchmarks", str(bench)]) == 0
    assert bench.read_text() == again  # regenerating replaces the block, it does not add another


def test_report_script_keeps_one_frontier_point_per_study_whose_teachers_differ(tmp_path):
    report = _load_report_script()
    d4 = _result(4, 200, [0.10, 0.10, 0.10], [0.20, 0.20, 0.20])
    d8 = _result(8, 400, [0.20, 0.22, 0.24], [0.26, 0.27, 0.28])
    d8["arms"]["teacher"] = [0.30, 0.31, 0.29]  # a teacher tuned by this study alone: same mean, other seeds
    teachers = [r for r in report.frontier_rows(report.load_results(_write_results(tmp_path, d4, d8))["toy"])
                if r["arm"] == "teacher"]
    assert [r["student_dims"] for r in teachers] == [[4], [8]]
    assert [report._point_label(r) for r in teachers] == ["teacher (study d=4)", "teacher (study d=8)"]


def test_report_script_marks_a_given_teacher_and_shows_the_student_arms_budget(tmp_path):
    report = _load_report_script()
    d4 = _result(4, 200, [0.10, 0.10, 0.10], [0.20, 0.21, 0.22])
    d4.update(teacher_given=True, command="kdray study data.path=/x/gowalla study.teacher=/x/runs/lgcn/teacher "
                                          "runs_dir=/x/runs study.results_dir=/x/results student.dim=4")
    d4["budget"]["trials"] = {"teacher": 0, "alone": 4, "distilled": 4}
    results = _write_results(tmp_path, d4)
    bench = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(results), "--benchmarks", str(bench)]) == 0
    text = bench.read_text()
    assert "| 0.3000 ± 0.0000 (given) | 0.1000 ± 0.0000 |" in text and "| 3 | 4 | 20 |" in text
    assert "| teacher (given, study d=4) | 10,000 |" in text
    assert "    kdray study data.path=DATA/gowalla study.teacher=TEACHER student.dim=4\n" in text and "/x" not in text


def test_report_script_names_a_given_ensemble_and_each_of_its_members_in_the_command(tmp_path):
    import shlex

    report = _load_report_script()
    d8 = _result(8, 200, [0.10, 0.10, 0.10], [0.20, 0.21, 0.22])
    d8.update(teacher_given=True, teacher_members=[{"checkpoint": "/x/a/teacher"}, {"checkpoint": "/x/b/teacher"}],
              command=shlex.join(["kdray", "study", "data.path=/x/gowalla",
                                  "study.teacher=[/x/a/teacher, /x/b/teacher]", "student.dim=8"]))
    d8["budget"]["trials"] = {"teacher": 0, "alone": 4, "distilled": 4}
    bench = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(_write_results(tmp_path, d8)), "--benchmarks", str(bench)]) == 0
    text = bench.read_text()
    assert "| 0.3000 ± 0.0000 (given ensemble of 2) |" in text
    assert "| teacher (given ensemble of 2, study d=8) | 10,000 |" in text
    assert "    kdray study data.path=DATA/gowalla 'study.teacher=[TEACHER1, TEACHER2]' student.dim=8\n" in text
    assert "TEACHER1, TEACHER2, ..." in text and "/x" not in text


def test_report_script_says_when_the_sizes_of_one_data_set_had_different_budgets(tmp_path):
    report = _load_report_script()
    d12 = _result(12, 600, [0.20, 0.20, 0.20], [0.25, 0.25, 0.25])
    d12.update(teacher_given=True)  # as on Gowalla: too costly to search the teacher, so fewer student trials too
    d12["budget"]["trials"] = {"teacher": 0, "alone": 2, "distilled": 2}
    results = _write_results(tmp_path, _result(8, 400, [0.20, 0.22, 0.24], [0.26, 0.27, 0.28]), d12)
    bench = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(results), "--benchmarks", str(bench)]) == 0
    text = bench.read_text()
    assert "every point tuned with the same budget" not in text
    assert "the two student arms of each size tuned with the same budget; the sizes' budgets differ" in text
    assert "| 3 | 8 | 40 |" in text and "| 3 | 2 | 60 |" in text  # each size's trials per arm and ASHA grace


def _eval_record(trained_on: int, recall: float, ndcg: float, best: int, run: int) -> dict:
    """A ``kdray eval --output`` record as the CLI writes it (test_train.py checks the CLI's side)."""
    return {"checkpoint": "/x/runs/lgcn/teacher", "role": "teacher",
            "command": "kdray eval --config configs/gowalla.yaml --checkpoint /x/runs/lgcn/teacher "
                       "data.path=/x/data/gowalla runs_dir=/x/runs --output /x/out.json",
            "model": {"name": "lightgcn", "dim": 64}, "n_params": 4_533_696,
            "train": {"lr": 0.01, "embedding_l2": 0.001, "batch_size": 1024, "seed": 0},
            "pairs": {"trained_on": trained_on, "train": 900, "valid": 100, "test": 300},
            # a model trained with a validation split has its best epoch's score (a refit has none)
            "trained": {"best_epoch": best, "epochs_run": run,
                        **({"valid_ndcg@20": 0.095} if trained_on < 1000 else {})},
            "test": {"test_recall@10": 0.1, "test_ndcg@10": 0.1, "test_recall@20": recall, "test_ndcg@20": ndcg,
                     "test_n_users": 30}}


def test_report_script_writes_the_trained_models_table_between_its_own_markers(tmp_path):
    report = _load_report_script()
    results = _write_results(tmp_path, _result(8, 400, [0.20, 0.22, 0.24], [0.26, 0.27, 0.28]))
    (results / "teachers").mkdir()
    (results / "teachers" / "a.json").write_text(json.dumps(_eval_record(900, 0.17344, 0.14006, 28, 31)))
    (results / "teachers" / "b.json").write_text(json.dumps(_eval_record(1000, 0.18, 0.15, 28, 28)))
    cosine = _eval_record(900, 0.19, 0.16, 12, 15)
    cosine["model"]["cosine_temperature"] = 0.1
    (results / "teachers" / "c.json").write_text(json.dumps(cosine))
    history = {**_eval_record(960, 0.178, 0.146, 30, 33), "test_graph_pairs": 1000}  # ranked over train + valid
    (results / "teachers" / "d.json").write_text(json.dumps(history))
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text(f"# before\n{report.TEACHERS_BEGIN}\nold\n{report.TEACHERS_END}\n## after\n")
    assert report.main(["--results", str(results), "--benchmarks", str(bench)]) == 0
    text = bench.read_text()
    assert text.startswith("# before\n") and "\nold\n" not in text and text.count(report.TEACHERS_BEGIN) == 1
    assert "| model | lr / embedding_l2 / batch | trained on (pairs) | graph at test | epochs (best / run) | " \
           "params | valid NDCG@20 | test Recall@20 | test NDCG@20 |" in text  # the largest K the records share
    # a record without test_graph_pairs was ranked over the model's own training graph
    assert "| lightgcn-64 (seed 0) | 0.01 / 0.001 / 1,024 | 900 (train, 90%) | train | 28 / 31 | 4,533,696 | " \
           "0.0950 | 0.1734 | 0.1401 |" in text
    assert "| 1,000 (train + valid, 100%) | train + valid | 28 / 28 | 4,533,696 | — | 0.1800 |" in text  # a refit
    assert "| lightgcn-64, cosine / 0.1 (seed 0) | 0.01 / 0.001 / 1,024 | 900 (train, 90%) | train | 12 / 15 |" in text
    assert "| 960 (train, 96%) | train + valid | 30 / 33 | 4,533,696 | 0.0950 | 0.1780 | 0.1460 |" in text
    assert "    kdray eval --config configs/gowalla.yaml --checkpoint CKPT data.path=DATA/gowalla --output " \
           "/x/out.json" in text and "runs_dir" not in text
    assert report.main(["--results", str(results), "--benchmarks", str(bench)]) == 0
    assert bench.read_text() == text  # regenerated in place
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no markers\n")
    assert report.main(["--results", str(results), "--benchmarks", str(plain)]) == 0
    assert "lightgcn-64" not in plain.read_text()  # only where the markers are


def test_report_script_joins_an_ensembles_members_in_one_row(tmp_path):
    report = _load_report_script()
    results = _write_results(tmp_path, _result(8, 400, [0.20, 0.22, 0.24], [0.26, 0.27, 0.28]))
    (results / "teachers").mkdir()
    small, large = _eval_record(1000, 0.18, 0.15, 28, 28), _eval_record(1000, 0.18, 0.15, 23, 23)
    large["model"]["dim"] = 128
    ensemble = {"checkpoints": ["/x/a", "/x/b"], "role": "ensemble", "weights": None, "n_params": 13_601_088,
                "command": "kdray eval --checkpoint /x/a --checkpoint /x/b data.path=/x/data/gowalla",
                "members": [small, large], "test": {**small["test"], "test_recall@20": 0.19, "test_ndcg@20": 0.16},
                "valid": {"valid_ndcg@20": 0.105}}
    (results / "teachers" / "e.json").write_text(json.dumps(ensemble))
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text(f"{report.TEACHERS_BEGIN}\n{report.TEACHERS_END}\n")
    assert report.main(["--results", str(results), "--benchmarks", str(bench)]) == 0
    text = bench.read_text()
    # equal cells appear once, different ones joined
    assert "| ensemble: lightgcn-64 (seed 0) + lightgcn-128 (seed 0) | 0.01 / 0.001 / 1,024 | 1,000 (train + valid, " \
           "100%) | train + valid | 28 / 28 + 23 / 23 | 13,601,088 | 0.1050 | 0.1900 | 0.1600 |" in text
    assert "    kdray eval --checkpoint CKPT --checkpoint CKPT data.path=DATA/gowalla" in text


def test_report_script_compares_the_losses_of_a_study_with_extra_losses(tmp_path):
    report = _load_report_script()
    r = _result(8, 400, [0.20, 0.22, 0.24], [0.26, 0.27, 0.28])
    r.update(loss="rd", valid={"winners": {"distilled": 0.31}},
             losses={"rrd": {"arms": [0.21, 0.22, 0.23], "winner_valid": 0.29}})
    results = _write_results(tmp_path, r)
    bench = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(results), "--benchmarks", str(bench)]) == 0
    text = bench.read_text()
    # rd: gain 0.05 of the gap 0.08; rrd: 0.22 - 0.22 = 0, within 2 x 0.02
    assert "| 8 | rd (main) | 0.3100 | 0.2700 ± 0.0100 | +0.0500 | 62.5% | yes |" in text
    assert "| 8 | rrd | 0.2900 | 0.2200 ± 0.0100 | +0.0000 | 0.0% | no |" in text


def test_report_script_draws_each_loss_as_its_own_line_whichever_arm_was_the_main_one(tmp_path):
    report = _load_report_script()
    d8 = _result(8, 400, [0.20, 0.22, 0.24], [0.26, 0.27, 0.28])
    d8.update(loss="rd", valid={"winners": {"distilled": 0.31}},
              losses={"rrd": {"arms": [0.29] * 3, "winner_valid": 0.3}})
    d4 = _result(4, 200, [0.10, 0.10, 0.10], [0.20, 0.20, 0.20])  # a later study: rrd main, rd the extra arm
    d4.update(loss="rrd", valid={"winners": {"distilled": 0.25}},
              losses={"rd": {"arms": [0.12] * 3, "winner_valid": 0.1}})
    results = _write_results(tmp_path, d8, d4)
    rows = report.frontier_rows(report.load_results(results)["toy"])
    points = {(r["arm"], r["student_dim"]): r["mean"] for r in rows}
    assert points[("distilled-rrd", 4)] == pytest.approx(0.20) and points[("distilled-rrd", 8)] == pytest.approx(0.29)
    assert points[("distilled-rd", 4)] == pytest.approx(0.12) and points[("distilled-rd", 8)] == pytest.approx(0.27)
    assert "distilled" not in {arm for arm, _ in points}
    bench = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(results), "--benchmarks", str(bench)]) == 0
    assert "| 0.2000 ± 0.0000 | rrd | +0.1000 |" in bench.read_text()  # the d4 row names its main loss


# ----------------------------------------------------------------------------------------------------------------
# A tiny study end to end, then --resume on the finished study, then the same study with one more loss, then another
# student size that shares the teacher arm.


@pytest.fixture(scope="module")
def study(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    # two seeds, not the default three: every seed past the first is one more Ray Train run per arm, and two show
    # that each seed's winner is retrained and that seed s distils from the teacher of seed s
    args = [*TINY, f"runs_dir={tmp / 'runs'}", f"study.results_dir={tmp / 'results'}", "study.dataset=tiny",
            "study.seeds=[0, 1]"]
    assert main(["study", *args]) == 0
    return {"tmp": tmp, "args": args, "result": json.loads((tmp / "results" / "tiny-d4.json").read_text())}


@pytest.mark.ray
@pytest.mark.timeout(1200)  # about 2 minutes on a quiet machine; the study runs in the fixture
def test_a_tiny_study_writes_every_field_for_three_arms_and_two_seeds(study):
    r = study["result"]
    for field in ("dataset", "metric", "student_dim", "params", "arms", "budget", "winners", "command"):
        assert field in r
    assert (r["dataset"], r["metric"], r["student_dim"]) == ("tiny", "test_ndcg@10", 4)
    assert set(r["arms"]) == {"teacher", "alone", "distilled"} and all(len(v) == 2 for v in r["arms"].values())
    assert all(0.0 <= x <= 1.0 for v in r["arms"].values() for x in v)
    assert r["params"]["student"] < r["params"]["teacher"]
    assert r["budget"]["trials"] == {"teacher": 1, "alone": 1, "distilled": 1}
    assert r["budget"]["scheduler"]["name"] == "ASHA" and r["seeds"] == [0, 1]
    assert r["budget"]["scheduler"]["grace_period"] == 1  # half of study.epochs
    assert set(r["winners"]["teacher"]["params"]) == {"teacher_train.lr"}
    assert set(r["winners"]["distilled"]["params"]) == {"student_train.lr", "distill.alpha"}
    assert r["command"].startswith("kdray study ") and "study.dataset=tiny" in r["command"]
    assert r["summary"]["gain"] == pytest.approx(sum(r["arms"]["distilled"]) / 2 - sum(r["arms"]["alone"]) / 2)
    assert isinstance(r["teacher_beats_alone_on_valid"], bool)
    assert r["popularity_shift"]["valid_mean"] > 0 and abs(r["popularity_shift"]["z"]) < 3  # a random split
    run = study["tmp"] / "runs" / "study-tiny-d4"
    assert "Trial status" in (run / "logs" / "ray.log").read_text()  # Tune's progress table, not on the console
    home = Path(r["teacher_run"])  # the teacher arm lives beside the study, for every student size to share
    assert home.parent == run.parent and home.name.startswith("study-tiny-teacher-")
    from kdray.checkpoint import load_checkpoint

    for seed in (0, 1):  # the distilled student of seed s distils from the teacher of seed s
        lineage = load_checkpoint(run / f"seed-{seed}" / "student").meta["lineage"]["teachers"]
        teacher = load_checkpoint(home / f"seed-{seed}" / "teacher")
        assert str(home) in lineage[0]
        assert teacher.config["teacher_train"]["seed"] == seed
        assert [Path(t).name for t in lineage] == [f"{r['winners']['teacher']['trial']}" if seed == 0 else "teacher"]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_resuming_a_finished_study_trains_nothing_new(study, capsys):
    run = study["tmp"] / "runs" / "study-tiny-d4"
    before = sorted(p.relative_to(run) for p in run.rglob("model.pt"))
    capsys.readouterr()
    assert main(["study", *study["args"]]) == 2  # without --resume an existing study is not overwritten
    assert "a study already exists" in capsys.readouterr().err
    assert main(["study", "--resume", *study["args"]]) == 0
    out = capsys.readouterr().out
    assert "training on Ray Train" not in out and out.count("reusing") == 6
    assert "Trial status" not in out and "[ray] Ray's own logs" in out
    assert "[study] distilled: 1 trials (1 completed, 0 stopped early by ASHA); winner " in out
    assert sorted(p.relative_to(run) for p in run.rglob("model.pt")) == before
    again = json.loads((study["tmp"] / "results" / "tiny-d4.json").read_text())
    assert again["arms"] == study["result"]["arms"] and again["winners"] == study["result"]["winners"]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_adding_a_loss_to_a_finished_study_trains_only_its_arm(study, capsys):
    run = study["tmp"] / "runs" / "study-tiny-d4"
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("model.pt")}
    capsys.readouterr()
    assert main(["study", "--resume", *study["args"], "study.losses=[listwise]"]) == 0
    out = capsys.readouterr().out
    after = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("model.pt")}
    assert all(after[p] == t for p, t in before.items())  # the three arms' models are reused, not retrained
    new = {p for p in after if p not in before}
    assert {p for p in new if p.parts[0].startswith("seed-")} == {
        Path(f"seed-{s}/student-listwise/model.pt") for s in (0, 1)}
    r = json.loads((study["tmp"] / "results" / "tiny-d4.json").read_text())
    assert r["arms"] == study["result"]["arms"] and r["loss"] == "rrd"
    lw = r["losses"]["listwise"]
    assert lw["arm"] == "distilled-listwise" and len(lw["arms"]) == 2 and set(lw["winner"]["params"]) == {
        "student_train.lr", "distill.alpha"}
    assert lw["summary"]["gain"] == pytest.approx(sum(lw["arms"]) / 2 - sum(r["arms"]["alone"]) / 2)
    assert r["budget"]["trials"]["distilled-listwise"] == r["budget"]["trials"]["distilled"] == 1
    assert "distilled with listwise" in out
    from kdray.checkpoint import load_checkpoint

    assert load_checkpoint(run / "seed-1" / "student-listwise").config["distill"]["loss"] == "listwise"


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_another_student_size_reuses_the_tuned_teacher_arm(study, capsys):
    home = Path(study["result"]["teacher_run"])
    before = {p: p.stat().st_mtime_ns for p in home.rglob("model.pt")}
    capsys.readouterr()
    assert main(["study", *study["args"], "student.dim=2", "study.seeds=[0]"]) == 0
    out = capsys.readouterr().out
    assert "[tune] teacher: resuming" in out and "[teacher] training on Ray Train" not in out
    assert {p: p.stat().st_mtime_ns for p in home.rglob("model.pt")} == before  # no teacher trained again
    r = json.loads((study["tmp"] / "results" / "tiny-d2.json").read_text())
    first = study["result"]
    assert r["teacher_run"] == str(home) and r["winners"]["teacher"] == first["winners"]["teacher"]
    assert r["arms"]["teacher"] == pytest.approx(first["arms"]["teacher"][:1])
    assert r["student_dim"] == 2 and r["params"]["student"] < first["params"]["student"]


@pytest.mark.ray
def test_one_given_teacher_is_scored_by_its_own_validation_and_lends_the_study_its_settings(study):
    # the path of a single study.teacher, without a study around it: the arm that run_study uses in place of the
    # teacher search (the test below runs a whole study from given teachers, an ensemble of two)
    from kdray.checkpoint import load_checkpoint
    from kdray.data.prepare import load_prepared
    from kdray.tune.study import given_teacher

    given = (Path(study["result"]["teacher_run"]) / "seed-1" / "teacher").resolve()
    cfg = study_config(load_config(None, [*study["args"], f"study.teacher={given}"]))
    data = load_prepared(study["tmp"] / "runs" / "study-tiny-d4" / "data")
    lines: list[str] = []
    cfg, arm = given_teacher(cfg, data, lines.append)
    teacher = load_checkpoint(given)
    assert arm.winner["trial"] == "given" and arm.winner["checkpoints"] == [str(given)] and arm.rows == []
    assert arm.winner["valid_ndcg@10"] == pytest.approx(teacher.metrics["valid_ndcg@10"])  # its own, not re-ranked
    assert "scores" not in arm.winner and arm.winner["n_params"] == sum(p.numel() for p in teacher.model.parameters())
    assert cfg.study.teacher == (str(given),) and cfg.distill.n_teachers == 1
    assert cfg.teacher_train.seed == 1 and cfg.teacher.dim == 32  # the records name the real teacher's settings
    assert len(lines) == 1 and lines[0].startswith(f"[study] teacher: given ({given}), mf-32, ")
    assert lines[0].endswith("; not tuned by this study")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_given_teachers_are_the_teacher_arm_of_every_seed_distilled_and_scored_as_one(study, capsys):
    # one study from two given models (the fixture's teachers of seeds 0 and 1) stands for both kinds of given
    # teacher: a whole study per kind would be two more Tune searches per arm, the slowest part of this file
    from kdray.checkpoint import load_checkpoint
    from kdray.data.prepare import load_prepared
    from kdray.distill.teacher import Ensemble
    from kdray.evaluate import evaluate_ensemble, evaluate_model

    home = Path(study["result"]["teacher_run"])
    members = [(home / f"seed-{s}" / "teacher").resolve() for s in (0, 1)]
    before = [m.joinpath("model.pt").stat().st_mtime_ns for m in members]
    capsys.readouterr()
    args = [*study["args"], "study.dataset=tiny-given", "student.dim=2", "study.seeds=[0, 1]",
            f"study.teacher=[{members[0]}, {members[1]}]"]
    assert main(["study", *args]) == 0
    out = capsys.readouterr().out
    assert "[teacher] training on Ray Train" not in out and "[tune] teacher" not in out  # no teacher search
    assert "an ensemble of 2 models" in out
    assert [m.joinpath("model.pt").stat().st_mtime_ns for m in members] == before  # used, never trained
    r = json.loads((study["tmp"] / "results" / "tiny-given-d2.json").read_text())
    ckpts = [load_checkpoint(m) for m in members]
    assert r["teacher_given"] is True and [m["checkpoint"] for m in r["teacher_members"]] == list(map(str, members))
    assert r["teacher_run"] == ", ".join(map(str, members)) and r["winners"]["teacher"]["trial"] == "given"
    assert r["params"]["teacher"] == sum(p.numel() for c in ckpts for p in c.model.parameters())
    assert r["budget"]["trials"] == {"teacher": 0, "alone": 1, "distilled": 1}
    # scored as one ranking, on test as `kdray eval` scores an ensemble and on validation over the same split; the
    # same models for both seeds, so the same score
    run = study["tmp"] / "runs" / "study-tiny-given-d2"
    data = load_prepared(run / "data")
    test = evaluate_ensemble(members, data, ks=[10])["test_ndcg@10"]
    assert r["arms"]["teacher"] == [pytest.approx(test), pytest.approx(test)]
    valid = evaluate_model(Ensemble([c.model for c in ckpts]), data, "valid", [10])["ndcg@10"]
    assert r["valid"]["winners"]["teacher"] == pytest.approx(valid)
    assert valid not in [pytest.approx(c.metrics["valid_ndcg@10"]) for c in ckpts]  # not a member's score
    for seed in (0, 1):  # every seed's student distils from both, as one
        student = load_checkpoint(run / f"seed-{seed}" / "student")
        assert student.meta["lineage"]["teachers"] == list(map(str, members))
        assert student.config["distill"]["n_teachers"] == 2
        assert load_checkpoint(run / f"seed-{seed}" / "student_alone").meta["lineage"]["teachers"] == []
    assert "the teacher was given" in out and "on validation the given teacher" in out


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("teacher, extra, message", [
    ("nope", [], "does not exist"),
    # the same catalog split another way: the teacher may have trained on the study's test items
    ("seed-0/teacher", ["data.split_ratios=[0.7, 0.15, 0.15]"], "was trained on another training split"),
], ids=["no-checkpoint", "other-split"])
def test_a_given_teacher_that_cannot_be_the_teacher_arm_is_refused_naming_the_key(study, capsys, teacher, extra,
                                                                                  message):
    home = Path(study["result"]["teacher_run"])
    capsys.readouterr()
    args = [*study["args"], *extra, "study.dataset=tiny-refused", f"study.teacher={home / teacher}"]
    assert main(["study", *args]) == 2
    err = capsys.readouterr().err
    assert "study.teacher:" in err and message in err and "Traceback" not in err
    assert not (study["tmp"] / "results" / "tiny-refused-d4.json").exists()


def test_a_second_study_waits_for_the_one_holding_the_shared_teacher(tmp_path):
    import threading

    from kdray.tune.study import teacher_lock

    events, logs = [], []
    first_in, release = threading.Event(), threading.Event()

    def first():
        with teacher_lock(tmp_path, logs.append):
            events.append("first in")
            first_in.set()
            release.wait(10)
            events.append("first out")

    def second():
        first_in.wait(10)
        with teacher_lock(tmp_path, logs.append):
            events.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for _ in range(200):  # until the second study says it waits
        if logs:
            break
        threading.Event().wait(0.05)
    release.set()
    for t in threads:
        t.join(10)
    assert events == ["first in", "first out", "second in"]
    assert logs == [f"[study] another study is tuning the same teacher in {tmp_path}; waiting for it to finish"]
