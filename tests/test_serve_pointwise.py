"""Serving the pointwise task: the plain predictor (no Ray) and the ``POST /predict`` route's bad input on Serve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdray.checkpoint import Vocab, empty_seen, load_checkpoint, save_checkpoint
from kdray.config import ServeConfig
from kdray.data.features import to_batch
from kdray.data.pointwise_data import FeatureSpec
from kdray.errors import CheckpointError
from kdray.models.pointwise import build_pointwise_model
from kdray.serve.ingress import free_port as _free_port  # outside the ephemeral range
from kdray.serve.pointwise import PointwisePredictor
from kdray.serve.predictor import RequestError

# 3 users, 4 items; "gender" and "age" are user fields, "genre" an item field, "mood" varies per row (context)
SPEC = FeatureSpec(
    user_ids=["u0", "u1", "7"], item_ids=["a", "b", "c", "d"], cat_names=["gender", "genre", "mood"],
    cat_vocab=[["F", "M"], ["comedy", "drama"], ["happy", "sad"]], num_names=["age"], num_mean=[30.0],
    num_std=[10.0], like_threshold=4.0, rating_mean=3.5,
    user_fields={"gender": [1.0, 2.0, 0.0], "age": [-1.0, 0.5, 2.0]}, item_fields={"genre": [1.0, 2.0, 2.0, 0.0]})


def make_checkpoint(directory: Path, heads=("like", "rating")) -> Path:
    torch.manual_seed(0)
    model = build_pointwise_model("fm", **SPEC.model_shape(), heads=list(heads), dim=4, rating_init=3.5)
    with torch.no_grad():  # non-trivial first-order weights, so that every feature changes the output
        model.first_order.weight.normal_()
        model.num_weights.normal_()
    vocab = Vocab(user_ids=np.array(SPEC.user_ids), item_ids=np.array(SPEC.item_ids), seen=empty_seen(3, 4))
    return save_checkpoint(directory, model, role="student", config={"name": "tiny"}, vocab=vocab,
                           features=SPEC.to_json(), metrics={"valid_auc": 0.7})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("pw") / "ckpt")


@pytest.fixture(scope="module")
def pred(ckpt) -> PointwisePredictor:
    return PointwisePredictor.from_checkpoint(ckpt, max_items=3)


def test_predictions_equal_the_model_on_the_hand_built_batch(pred):
    out = pred.predict(7, ["b", "d"], {"mood": "sad"})
    # user "7": gender unknown (0), age 2.0 (standardised); items b, d: genre 2 and 0; mood "sad" = id 2
    batch = to_batch({"user": np.array([2, 2]), "item": np.array([1, 3]),
                      "cat": np.array([[0, 2, 2], [0, 0, 2]]), "num": np.array([[2.0], [2.0]], np.float32)})
    with torch.no_grad():
        ref = pred.model(batch)
    assert [p.item_id for p in out] == ["b", "d"]
    assert [p.probability for p in out] == pytest.approx(torch.sigmoid(ref["like"]).tolist(), abs=1e-6)
    assert [p.rating for p in out] == pytest.approx(ref["rating"].tolist(), abs=1e-6)


def test_request_features_override_and_standardise(pred):
    batch = pred.batch("u0", ["a"], {"age": 50, "genre": "drama", "mood": "never-seen"})
    assert batch["num"].tolist() == [[pytest.approx(2.0)]]  # (50 - 30) / 10
    assert batch["cat"].tolist() == [[1, 2, 0]]  # gender from the user, genre overridden, unseen mood -> unknown
    default = pred.batch("u1", ["a", "c"])
    assert default["cat"].tolist() == [[2, 1, 0], [2, 2, 0]] and default["num"].tolist() == [[0.5], [0.5]]
    assert pred.predict("u0", ["a"], {"age": 50})[0].probability != pred.predict("u0", ["a"])[0].probability


@pytest.mark.parametrize("args, field, fragment", [
    (("nobody", ["a"]), "user_id", "unknown user"),
    (("u0", ["a", "zz"]), "item_ids", "unknown item 'zz'"),
    (("u0", []), "item_ids", "at least one"),
    (("u0", ["a", "b", "c", "d"]), "item_ids", "limit of 3"),
    (("u0", ["a"], {"colour": "red"}), "features", "unknown feature 'colour'"),
    (("u0", ["a"], {"age": "old"}), "features.age", "finite number"),
    (("u0", ["a"], {"age": float("nan")}), "features.age", "finite number"),
    (("u0", ["a"], {"gender": 1.5}), "features.gender", "takes a string"),
])
def test_bad_requests_name_the_field(pred, args, field, fragment):
    with pytest.raises(RequestError) as e:
        pred.predict(*args)
    assert e.value.field == field and fragment in e.value.message


def test_like_only_model_has_no_rating_and_ranking_checkpoint_is_refused(tmp_path):
    single = PointwisePredictor.from_checkpoint(make_checkpoint(tmp_path / "like", heads=("like",)))
    assert single.predict("u0", ["a"])[0].rating is None
    ckpt = load_checkpoint(tmp_path / "like")
    ckpt.features = None
    with pytest.raises(CheckpointError, match="ranking checkpoint"):
        PointwisePredictor(ckpt, version="x")


@pytest.mark.ray
def test_predict_route_answers_and_rejects_bad_input_with_422(ray_cluster, ckpt):
    requests = pytest.importorskip("requests")
    from ray import serve

    from kdray.serve.app import APP_NAME, serve_checkpoint

    port = _free_port()
    cfg = ServeConfig(port=port, max_request_batch=3, max_batch_size=4, max_ongoing_requests=8, min_replicas=1,
                      max_replicas=1, num_cpus=0.25)
    base = f"http://127.0.0.1:{port}"
    try:
        serve_checkpoint(ckpt, cfg, blocking=False)
        r = requests.post(f"{base}/predict", json={"user_id": 7, "item_ids": ["b", "d"], "features": {"mood": "sad"}},
                          timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user_id"] == 7 and [p["item_id"] for p in body["predictions"]] == ["b", "d"]
        assert all(0 < p["probability"] < 1 and p["rating"] is not None for p in body["predictions"])
        bad = {  # request -> the field the 422 names
            "user_id": {"user_id": "nobody", "item_ids": ["a"]},
            "item_ids": {"user_id": "u0", "item_ids": ["a", "zz"]},
            "features": {"user_id": "u0", "item_ids": ["a"], "features": {"colour": "red"}},
            "features.age": {"user_id": "u0", "item_ids": ["a"], "features": {"age": "old"}},
        }
        for field, request in bad.items():
            r = requests.post(f"{base}/predict", json=request, timeout=10)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], (field, r.text)
        for request in ({"user_id": "u0", "item_ids": ["a"] * 4}, {"user_id": "u0", "item_ids": []},
                        {"user_id": "u0", "item_ids": ["a"], "extra": 1}, {"user_id": None, "item_ids": ["a"]},
                        {"user_id": "u0", "item_ids": ["a"], "features": {"age": [1]}}):
            r = requests.post(f"{base}/predict", json=request, timeout=10)
            assert r.status_code == 422, (request, r.text)
        r = requests.post(f"{base}/recommend", json={"user_id": "u0", "k": 2}, timeout=10)
        assert r.status_code == 422 and "POST /predict" in r.json()["detail"][0]["msg"]
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()  # the next test's Serve starts on its own port: a running Serve keeps the old one
