"""The benchmark scripts that run without Ray: their smoke tests still run against kdray's current APIs, and the
ones that read real data sets ask for the data folder instead of guessing one."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

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


@pytest.mark.parametrize("name", ["foldin_latency", "replay", "serve_load", "dataset_counts"])
def test_scripts_that_read_real_data_ask_for_its_folder(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        _script(name).main([])
    assert exit_.value.code == 2 and "--data" in capsys.readouterr().err
