"""Checkpoints: self-describing, atomic, loaded without unpickling, and clear about every way they can be broken."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from kdray.checkpoint import (CONFIG, META, MODEL, VOCAB, WEIGHTS, Vocab, check_trained_within, load_checkpoint,
                              save_checkpoint, update_metrics)
from kdray.errors import CheckpointError
from kdray.models import build_model
from kdray.sparse import Csr


def _vocab(n_users: int = 5, n_items: int = 7) -> Vocab:
    seen = Csr.from_pairs(np.array([0, 0, 3]), np.array([1, 6, 2]), n_users, n_items)
    return Vocab(user_ids=np.array([f"u{i}" for i in range(n_users)]),
                 item_ids=np.array([f"i{i}" for i in range(n_items)]), seen=seen)


def _save(path, model=None, **kw):
    torch.manual_seed(0)
    model = model or build_model("two_tower", n_users=5, n_items=7, dim=4, hidden=(6,),
                                 item_features=np.eye(7, 3, dtype=np.float32))
    save_checkpoint(path, model, role="student", config={"name": "t"}, vocab=_vocab(),
                    metrics={"valid_ndcg@10": 0.5}, lineage={"teachers": ["/x"]}, **kw)
    return model


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model = _save(tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    users = torch.arange(5)
    assert torch.allclose(ckpt.model.score_all(users), model.eval().score_all(users))
    assert ckpt.meta["role"] == "student" and ckpt.meta["lineage"] == {"teachers": ["/x"]}
    assert ckpt.metrics == {"valid_ndcg@10": 0.5} and ckpt.config == {"name": "t"}
    assert list(ckpt.vocab.item_ids) == [f"i{i}" for i in range(7)]
    assert ckpt.vocab.seen.row(0).tolist() == [1, 6]
    assert ckpt.vocab.item_popularity().tolist() == [0, 1, 1, 0, 0, 0, 1]


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path):
    _save(tmp_path / "ckpt")
    _save(tmp_path / "ckpt", model=build_model("mf", n_users=5, n_items=7, dim=3))
    assert load_checkpoint(tmp_path / "ckpt").args["name"] == "mf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path / "ckpt")
    nan_model = build_model("mf", n_users=5, n_items=7, dim=3)
    with torch.no_grad():
        nan_model.user_emb.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite weights"):
        _save(tmp_path / "ckpt", model=nan_model)
    assert load_checkpoint(tmp_path / "ckpt").args["name"] == "two_tower"  # the old one is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_teacher_may_have_trained_only_on_the_datas_training_pairs(tmp_path):
    """Its pairs (0,1), (0,6), (3,2) inside a larger training split: fine (an updated run's teacher). One of them
    outside it (here: held out as validation or test): refused, naming that pair by its raw ids."""
    from types import SimpleNamespace

    _save(tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    vocab = _vocab()

    def data(users, items):
        return SimpleNamespace(train=Csr.from_pairs(np.array(users), np.array(items), 5, 7),
                               user_ids=vocab.user_ids, item_ids=vocab.item_ids)

    check_trained_within(ckpt, data([0, 0, 3], [1, 6, 2]))
    check_trained_within(ckpt, data([0, 0, 1, 3, 4], [1, 6, 1, 2, 0]))
    with pytest.raises(CheckpointError, match=r"1 \(user, item\) pairs .* user 'u3', item 'i2'"):
        check_trained_within(ckpt, data([0, 0, 3, 4], [1, 6, 5, 2]))


def test_update_metrics_merges(tmp_path):
    _save(tmp_path / "ckpt")
    update_metrics(tmp_path / "ckpt", {"test_ndcg@10": 0.4})
    assert load_checkpoint(tmp_path / "ckpt").metrics == {"valid_ndcg@10": 0.5, "test_ndcg@10": 0.4}


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / WEIGHTS).unlink(), "missing model.pt"),
    (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:100]), "model.pt cannot be loaded"),
    (lambda d: (d / META).write_text("{not json"), "meta.json is unreadable or corrupt"),
    (lambda d: (d / META).write_text(json.dumps({"format_version": 99})), "checkpoint format 99"),
    (lambda d: (d / MODEL).write_text(json.dumps({"args": {"name": "mf", "n_users": 5, "n_items": 7, "dim": 9}})),
     "weights do not match the model arguments"),
    (lambda d: (d / VOCAB).write_bytes(b"garbage"), "vocab.npz cannot be loaded"),
    (lambda d: (d / CONFIG).unlink(), "missing config.json"),
])
def test_damaged_checkpoints_fail_clearly(tmp_path, damage, message):
    _save(tmp_path / "ckpt")
    damage(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    _save(tmp_path / "ckpt")

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    (tmp_path / "ckpt" / WEIGHTS).write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(tmp_path / "ckpt")
