"""A new user's first hour (issue 13): a console with kdray's lines only, arguments in any order, and the outputs
people look at (learning curves, TensorBoard).

The fast tests need no Ray. The end-to-end test runs ``kdray run`` as a user would, in a subprocess with its own
local Ray cluster (the session fixture's cluster streams no worker output, which is the point under test), on tiny
synthetic data.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdray.cli import parse_args
from kdray.console import Console, ray_output_to
from kdray.plots import learning_curves
from kdray.tracking import TensorBoardLog, tag

ROOT = Path(__file__).resolve().parents[1]


def epoch_event(epoch: int, epochs: int, ndcg: float) -> dict:
    return {"text": f"epoch {epoch}/{epochs} loss 1.0000 val ndcg@10 {ndcg:.4f}", "epoch": epoch, "epochs": epochs,
            "metrics": {"epoch": epoch, "loss": 1.0, "ndcg@10": ndcg, "epoch_seconds": 0.5}}


# ----------------------------------------------------------------------------------------------------------------
# Command line: options and key=value overrides in any order.


@pytest.mark.parametrize("argv", [
    ["data", "runs_dir=/tmp/x", "--config", "configs/ml-100k.yaml", "data.path=/p"],
    ["data", "--config", "configs/ml-100k.yaml", "runs_dir=/tmp/x", "data.path=/p"],
    ["data", "runs_dir=/tmp/x", "data.path=/p", "-c", "configs/ml-100k.yaml"],
])
def test_overrides_and_options_mix_in_any_order(argv):
    args = parse_args(argv)
    assert args.command == "data" and args.config == "configs/ml-100k.yaml"
    assert args.overrides == ["runs_dir=/tmp/x", "data.path=/p"]


def test_repeated_options_between_overrides():
    args = parse_args(["distill", "a=1", "--teacher", "t1", "b=2", "--teacher", "t2", "--verbose", "c=3"])
    assert (args.command, args.teacher, args.verbose, args.overrides) == ("distill", ["t1", "t2"], True,
                                                                          ["a=1", "b=2", "c=3"])


def test_unknown_command_and_unknown_option_still_fail(capsys):
    with pytest.raises(SystemExit):
        parse_args(["bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["run", "a=1", "--nope"])
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The console and the Ray log.


def test_console_prints_one_line_per_epoch_with_the_stage():
    out = io.StringIO()
    console = Console(out, bar=False)
    console.log("[teacher] training")
    for e in (1, 2):
        console.epoch("teacher-2", epoch_event(e, 2, 0.1 * e))
    console.epoch("teacher-2", {"text": "early stop: no ndcg@10 improvement for 5 epochs"})
    assert out.getvalue().splitlines() == [
        "[teacher] training", "[teacher-2] epoch 1/2 loss 1.0000 val ndcg@10 0.1000",
        "[teacher-2] epoch 2/2 loss 1.0000 val ndcg@10 0.2000", "[teacher-2] early stop: no ndcg@10 improvement for 5 epochs"]


def test_console_bar_mode_draws_a_tqdm_bar_per_stage():
    out = io.StringIO()
    console = Console(out, bar=True)
    for e in (1, 2, 3):
        console.epoch("student", epoch_event(e, 3, 0.25))
    text = out.getvalue()
    assert "[student]" in text and "3/3" in text and "ndcg@10 0.2500" in text and "epoch 1/3" not in text
    console.epoch("teacher", epoch_event(1, 5, 0.5))
    console.epoch("teacher", {"text": "early stop: no ndcg@10 improvement for 1 epochs", "final": True})
    assert console._bars == {} and "[teacher] early stop" in out.getvalue()


def test_verbose_console_leaves_epochs_to_rays_stream():
    out = io.StringIO()
    console = Console(out, bar=False, verbose=True)
    console.epoch("teacher", epoch_event(1, 1, 0.5))
    console.log("table")
    assert out.getvalue() == "table\n"


def test_ray_output_goes_to_the_log_file_and_kdray_lines_to_the_console(tmp_path, capfd):
    console = Console()  # made before the redirection: keeps the real stdout
    log = tmp_path / "logs" / "ray.log"
    with ray_output_to(log):
        print("(RayTrainWorker pid=1) Reporting training result 1", flush=True)
        os.write(2, b"[C++] core_worker.cc: native line\n")  # what bypasses Python's sys.stderr
        console.log("[teacher] epoch 1/1")
    console.log("after")
    out, err = capfd.readouterr()
    assert out == "[teacher] epoch 1/1\nafter\n" and err == ""
    text = log.read_text()
    assert "Reporting training result 1" in text and "native line" in text and "[teacher]" not in text
    with ray_output_to(None):  # --verbose: nothing moves
        print("shown", flush=True)
    assert capfd.readouterr().out == "shown\n"


def test_console_under_an_in_memory_stdout(tmp_path, capsys):
    console = Console()  # pytest's capsys: a stdout without a file descriptor
    with ray_output_to(tmp_path / "ray.log"):
        print("Started a local Ray instance.")
        console.log("[data] 120 users")
    console.close()
    assert capsys.readouterr().out == "[data] 120 users\n"
    assert "Started a local Ray instance." in (tmp_path / "ray.log").read_text()


# ----------------------------------------------------------------------------------------------------------------
# Learning curves and TensorBoard.


def test_learning_curves_png(tmp_path):
    import matplotlib.image

    histories = [("teacher", [{"epoch": 1, "ndcg@10": 0.1}, {"epoch": 2, "ndcg@10": 0.3}]),
                 ("student (alone)", [{"epoch": 1, "ndcg@10": 0.2}]), ("no history", [])]
    path = learning_curves(histories, "ndcg@10", tmp_path / "learning_curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[:2] == (540, 900)  # 7.5 x 4.5 inches at 120 dpi


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Reads a TensorBoard event file: TFRecords (length, crc, Event proto, crc) of tensorboardX's own protos."""
    from tensorboardX.proto.event_pb2 import Event

    (path,) = logdir.glob("events.out.tfevents.*")
    data, pos, out = path.read_bytes(), 0, {}
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, round(value.simple_value, 6)))
    return out


def test_tensorboard_log_writes_each_epoch_as_it_arrives(tmp_path):
    assert [tag(n) for n in ("ndcg@10", "loss", "distill", "epoch_seconds")] == [
        "valid/ndcg_at_10", "train/loss", "train/distill", "time/epoch_seconds"]
    with TensorBoardLog(tmp_path / "teacher") as board:
        board.epoch(epoch_event(1, 2, 0.25))
        board.epoch({"text": "resuming after epoch 1"})  # a note carries no numbers
        board.epoch(epoch_event(2, 2, 0.5))
        # visible while the writer is still open (tensorboardX writes from its own thread: allow it a moment)
        deadline = time.monotonic() + 10
        while _scalars(tmp_path / "teacher").get("valid/ndcg_at_10") != [(1, 0.25), (2, 0.5)]:
            assert time.monotonic() < deadline, _scalars(tmp_path / "teacher")
            time.sleep(0.05)
    assert _scalars(tmp_path / "teacher") == {"train/loss": [(1, 1.0), (2, 1.0)],
                                              "valid/ndcg_at_10": [(1, 0.25), (2, 0.5)],
                                              "time/epoch_seconds": [(1, 0.5), (2, 0.5)]}


# ----------------------------------------------------------------------------------------------------------------
# End to end: `kdray run` as a new user runs it.

TINY = ["data.n_users=120", "data.n_items=80", "data.n_interactions=3000", "data.n_clusters=4", "teacher.name=mf",
        "teacher.dim=16", "teacher.hidden=[]", "student.dim=4", "teacher_train.epochs=2", "student_train.epochs=2",
        "teacher_train.lr=0.02", "student_train.lr=0.02", "teacher_train.batch_size=64",
        "student_train.batch_size=64", "eval.batch_size=64", "distill.n_teachers=1",
        "distill.init_from_teacher=false",
        "teacher_search.enabled=false"]  # the teacher trains in the pipeline, so its epoch lines are on the console


@pytest.mark.ray
@pytest.mark.slow
def test_kdray_run_console_shows_kdray_lines_only(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "kdray.cli", "run", *TINY, f"runs_dir={tmp_path}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert "Traceback" not in console and "Reporting training result" not in console
    lines = console.splitlines()
    epoch_lines = [line for line in lines if " epoch " in line]
    # teacher 2 epochs, student 2, student alone 2: one line each, and a bounded number of lines besides
    assert [line.split(" val ")[0].split(" loss ")[0] for line in epoch_lines] == [
        "[teacher] epoch 1/2", "[teacher] epoch 2/2", "[student] epoch 1/2", "[student] epoch 2/2",
        "[student_alone] epoch 1/2", "[student_alone] epoch 2/2"]
    assert len(lines) <= 25, console
    assert not any("INFO" in line or "pid=" in line for line in lines), console

    run = tmp_path / "default"
    ray_log = (run / "logs" / "ray.log").read_text()
    assert "Started a local Ray instance" in ray_log and "[teacher] epoch 2/2" in ray_log  # the worker's own line
    assert "![Learning curves" in (run / "report.md").read_text()
    assert (run / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    for stage in ("teacher", "student", "student_alone"):
        assert [step for step, _ in _scalars(run / "tensorboard" / stage)["valid/ndcg_at_10"]] == [1, 2]


def test_without_mlflow_a_search_gets_no_mlflow_callback(monkeypatch):
    import importlib.util

    from kdray.tracking import mlflow_callbacks

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert mlflow_callbacks("tiny-distilled") == []


def test_with_mlflow_a_search_logs_through_rays_callback():
    pytest.importorskip("mlflow")
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from kdray.tracking import mlflow_callbacks

    (callback,) = mlflow_callbacks("tiny-distilled")
    assert isinstance(callback, MLflowLoggerCallback) and callback.experiment_name == "tiny-distilled"
