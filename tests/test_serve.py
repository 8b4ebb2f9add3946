"""Serving: the plain predictor (no Ray) and one Serve integration test on the shared local cluster."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdray.checkpoint import Vocab, save_checkpoint
from kdray.config import ServeConfig
from kdray.errors import CheckpointError, ConfigError
from kdray.models import build_model
from kdray.serve.ingress import free_port as _free_port  # outside the ephemeral range
from kdray.serve.predictor import Query, Recommender, RequestError, checkpoint_version
from kdray.sparse import Csr

USER_IDS = np.array(["u0", "u1", "7", "u3", "u4", "u5"])  # "7": an id a client may send as the int 7
ITEM_IDS = np.array([f"item-{c}" for c in "abcdefghij"])  # 10 items
# Training items per dense user id; u5 has seen all but two items.
SEEN = {0: [0, 1, 2], 1: [3], 2: [], 3: [4, 5, 6, 7], 4: [0, 9], 5: [0, 1, 2, 3, 4, 5, 6, 7]}


def _vocab() -> Vocab:
    rows = [u for u, items in SEEN.items() for _ in items]
    cols = [i for items in SEEN.values() for i in items]
    return Vocab(user_ids=USER_IDS, item_ids=ITEM_IDS,
                 seen=Csr.from_pairs(np.array(rows), np.array(cols), len(USER_IDS), len(ITEM_IDS)))


def make_checkpoint(directory: Path, *, name: str = "mf", seed: int = 0, **model_kw) -> Path:
    torch.manual_seed(seed)
    model = build_model(name, n_users=len(USER_IDS), n_items=len(ITEM_IDS), dim=4, **model_kw)
    return save_checkpoint(directory, model, role="student", config={"name": "tiny"}, vocab=_vocab(),
                           metrics={"ndcg@10": 0.5}, lineage={"teacher": "runs/tiny/teacher", "seed": seed})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "v1")


@pytest.fixture(scope="module")
def rec(ckpt) -> Recommender:
    return Recommender.from_checkpoint(ckpt)


def _brute_force(rec: Recommender, user: int, k: int, exclude_seen: bool) -> list[str]:
    """Reference top-k: the model's own score_all, seen items dropped by a Python loop, full sort."""
    with torch.no_grad():
        scores = rec.model.score_all(torch.tensor([user]))[0].numpy()
    order = [i for i in np.argsort(-scores, kind="stable") if not (exclude_seen and i in SEEN[user])]
    return [ITEM_IDS[i] for i in order[:k]]


# ----------------------------------------------------------------------------------------------------------------
# Predictor


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_topk_matches_brute_force_and_masks_seen_items(rec, exclude_seen):
    for user in range(len(USER_IDS)):
        (out,) = rec.recommend([USER_IDS[user]], k=2, exclude_seen=exclude_seen)
        assert out.item_ids == _brute_force(rec, user, 2, exclude_seen)
        assert out.scores == sorted(out.scores, reverse=True)
        assert not out.cold_start
        if exclude_seen:
            assert not {ITEM_IDS[i] for i in SEEN[user]} & set(out.item_ids)


def test_masking_never_returns_a_seen_item_even_when_k_exceeds_the_unseen(rec):
    (out,) = rec.recommend(["u5"], k=5)  # u5 has seen 8 of 10 items: only two are left
    assert sorted(out.item_ids) == ["item-i", "item-j"]
    assert len(out.scores) == 2 and all(np.isfinite(out.scores))


def test_raw_ids_map_both_ways_and_int_ids_are_looked_up_as_strings(rec):
    by_int, by_str = rec.recommend([7, "7"], k=3)
    assert by_int.item_ids == by_str.item_ids == _brute_force(rec, 2, 3, True)
    assert by_int.user_id == 7 and by_str.user_id == "7"  # echoed as sent
    assert set(by_int.item_ids) <= set(ITEM_IDS.tolist())


def test_unknown_user_gets_the_most_popular_items_flagged_cold_start(rec):
    (out,) = rec.recommend(["nobody"], k=3)
    assert out.cold_start
    # training counts: a = 3 (users 0, 4, 5); b..h = 2; j = 1; i = 0; ties go to the smaller item id: a, b, c
    popularity = np.bincount([i for items in SEEN.values() for i in items], minlength=len(ITEM_IDS))
    assert out.item_ids == ["item-a", "item-b", "item-c"]
    assert out.scores == sorted(popularity.tolist(), reverse=True)[:3]


def test_batch_equals_single_requests_with_mixed_k_and_masking(rec):
    queries = [Query("u0", 3, True), Query("nobody", 2, True), Query(7, 5, False), Query("u3", 1, True),
               Query("u0", 4, False)]
    batch = rec.recommend_queries(queries)
    for q, got in zip(queries, batch):
        (single,) = rec.recommend_queries([q])
        assert got.item_ids == single.item_ids and got.cold_start == single.cold_start
        np.testing.assert_allclose(got.scores, single.scores, rtol=1e-5, atol=1e-6)
        assert len(got.item_ids) == q.k


@pytest.mark.parametrize("k, fragment", [(0, ">= 1"), (-3, ">= 1"), (11, "catalog"), (True, "integer")])
def test_k_out_of_range_is_a_request_error_naming_k(rec, k, fragment):
    with pytest.raises(RequestError, match=fragment) as e:
        rec.recommend(["u0"], k=k)
    assert e.value.field == "k"


def test_max_k_caps_k_below_the_catalog(ckpt):
    capped = Recommender.from_checkpoint(ckpt, max_k=4)
    assert len(capped.recommend(["u1"], k=4)[0].item_ids) == 4
    with pytest.raises(RequestError, match="max_k=4"):
        capped.recommend(["u1"], k=5)


def test_two_tower_cached_item_tower_scores_like_score_all(tmp_path):
    rec = Recommender.from_checkpoint(make_checkpoint(tmp_path / "tt", name="two_tower", hidden=(8, 4)))
    users = torch.arange(len(USER_IDS))
    with torch.no_grad():
        torch.testing.assert_close(rec.score_all(users), rec.model.score_all(users), rtol=1e-5, atol=1e-6)
    assert rec.recommend(["u0"], k=2)[0].item_ids == _brute_force(rec, 0, 2, True)


def test_version_is_a_content_hash_and_info_describes_the_checkpoint(ckpt, rec, tmp_path):
    assert rec.version == checkpoint_version(ckpt) and len(rec.version) == 12
    other = make_checkpoint(tmp_path / "v2", seed=1)
    assert checkpoint_version(other) != rec.version
    info = rec.info()
    assert info["architecture"]["name"] == "mf" and info["parameters"] == 6 * 4 + 10 * 4 + 10
    assert info["teacher"]["teacher"] == "runs/tiny/teacher" and info["metrics"] == {"ndcg@10": 0.5}
    assert info["created_at"] and info["name"] == "tiny/student" and info["n_items"] == 10


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Recommender.from_checkpoint(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------------------------
# Serve, on the shared local cluster


@pytest.mark.ray
def test_serve_routes_bad_requests_and_zero_downtime_redeploy(ray_cluster, ckpt, tmp_path):
    requests = pytest.importorskip("requests")
    from ray import serve

    from kdray.serve.app import APP_NAME, serve_checkpoint

    port = _free_port()
    cfg = ServeConfig(port=port, max_k=5, max_request_batch=3, max_batch_size=4, max_ongoing_requests=8,
                      min_replicas=1, max_replicas=1, num_cpus=0.25)
    base = f"http://127.0.0.1:{port}"
    v2 = make_checkpoint(tmp_path / "v2", seed=1)
    try:
        serve_checkpoint(ckpt, cfg, blocking=False)
        http = requests.Session()
        v1_version = checkpoint_version(ckpt)

        health = http.get(f"{base}/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["model"]["version"] == v1_version
        assert http.head(f"{base}/healthz", timeout=10).status_code == 200  # load balancers probe with HEAD
        # curl -d sends a form content type; the body is JSON all the same
        form = http.post(f"{base}/recommend", data=b'{"user_id": "u0", "k": 2}',
                         headers={"content-type": "application/x-www-form-urlencoded"}, timeout=10)
        assert form.status_code == 200 and form.json()["user_id"] == "u0", form.text

        r = http.post(f"{base}/recommend", json={"user_id": "u0", "k": 3}, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user_id"] == "u0" and not body["cold_start"] and len(body["items"]) == 3
        assert body["model"] == {"name": "tiny/student", "version": v1_version}
        assert not {"item-a", "item-b", "item-c"} & {it["item_id"] for it in body["items"]}  # u0's seen items

        cold = http.post(f"{base}/recommend", json={"user_id": 12345}, timeout=10)  # default k=10 > max_k=5
        assert cold.status_code == 422 and cold.json()["detail"][0]["loc"] == ["body", "k"]
        cold = http.post(f"{base}/recommend", json={"user_id": 12345, "k": 2, "exclude_seen": False}, timeout=10)
        assert cold.status_code == 200 and cold.json()["cold_start"] and cold.json()["user_id"] == 12345

        batch = http.post(f"{base}/recommend/batch", json={"user_ids": ["u0", 7, "nobody"], "k": 2}, timeout=10)
        assert batch.status_code == 200, batch.text
        results = batch.json()["results"]
        assert [x["user_id"] for x in results] == ["u0", 7, "nobody"]
        assert [x["cold_start"] for x in results] == [False, False, True]
        assert results[0]["items"] == body["items"][:2]  # batch route == single route
        assert batch.json()["model"]["version"] == v1_version

        # Concurrent single requests share @serve.batch batches and all succeed.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda u: requests.post(f"{base}/recommend", json={"user_id": u, "k": 2},
                                                          timeout=10).status_code, list(USER_IDS) * 4))
        assert codes == [200] * len(codes)

        info = http.get(f"{base}/model", timeout=10).json()
        # 24 of the single requests so far came from 8 concurrent clients: some of them shared a batch.
        assert info["replica"]["batched_requests"] > info["replica"]["batches"]
        assert info["architecture"]["name"] == "mf" and info["teacher"]["teacher"] == "runs/tiny/teacher"
        assert info["version"] == v1_version and "created_at" in info and "parameters" in info
        assert http.get(f"{base}/docs", timeout=10).status_code == 200
        paths = http.get(f"{base}/openapi.json", timeout=10).json()["paths"]
        assert {"/recommend", "/recommend/batch", "/healthz", "/model"} <= set(paths)

        bad = {
            "malformed JSON": ("/recommend", b'{"user_id": "u0", "k": ', "k"),
            "k wrong type": ("/recommend", {"user_id": "u0", "k": "ten"}, "k"),
            "k float": ("/recommend", {"user_id": "u0", "k": 2.5}, "k"),
            "k zero": ("/recommend", {"user_id": "u0", "k": 0}, "k"),
            "k over max_k": ("/recommend", {"user_id": "u0", "k": 6}, "k"),
            "k over catalog": ("/recommend/batch", {"user_ids": ["u0"], "k": 11}, "k"),
            "user_id missing": ("/recommend", {"k": 2}, "user_id"),
            "user_id a list": ("/recommend", {"user_id": ["u0"], "k": 2}, "user_id"),
            "int user_id over 256 digits": ("/recommend", {"user_id": 10 ** 256, "k": 2}, "user_id"),
            "str user_id over 256 chars": ("/recommend", {"user_id": "u" * 257, "k": 2}, "user_id"),
            "exclude_seen not bool": ("/recommend", {"user_id": "u0", "k": 2, "exclude_seen": "yes"}, "exclude_seen"),
            "unknown field": ("/recommend", {"user_id": "u0", "kk": 2}, "kk"),
            "batch over limit": ("/recommend/batch", {"user_ids": ["u0", "u1", "u3", "u4"], "k": 2}, "user_ids"),
            "empty batch": ("/recommend/batch", {"user_ids": [], "k": 2}, "user_ids"),
        }
        for what, (route, payload, field) in bad.items():
            if isinstance(payload, bytes):
                r = http.post(f"{base}{route}", data=payload, headers={"content-type": "application/json"},
                              timeout=10)
            else:
                r = http.post(f"{base}{route}", json=payload, timeout=10)
            assert r.status_code == 422, (what, r.status_code, r.text)
            locs = [d["loc"] for d in r.json()["detail"]]
            assert any(field in map(str, loc) for loc in locs) or what == "malformed JSON", (what, locs)
            assert all(d.get("msg") for d in r.json()["detail"]), what

        # Redeploy a new checkpoint under the same app while a client keeps calling: no failures, and the
        # answers switch to the new version.
        statuses: list[tuple[float, int, str]] = []  # (time answered, HTTP status, version)
        stop = threading.Event()

        def client() -> None:
            s = requests.Session()
            while not stop.is_set():
                try:
                    resp = s.post(f"{base}/recommend", json={"user_id": "u1", "k": 2}, timeout=30)
                    statuses.append((time.monotonic(), resp.status_code, resp.json()["model"]["version"]))
                except Exception as e:  # a refused connection is a failure too
                    statuses.append((time.monotonic(), 0, repr(e)))

        t = threading.Thread(target=client, daemon=True)
        t.start()
        time.sleep(0.5)
        update_started = time.monotonic()
        serve_checkpoint(v2, cfg, blocking=False)  # returns once the new version is live
        update_done = time.monotonic()
        v2_version = checkpoint_version(v2)
        deadline = time.monotonic() + 20  # old replicas drain after the new one is up
        while time.monotonic() < deadline and (not statuses or statuses[-1][2] != v2_version):
            time.sleep(0.1)
        time.sleep(0.3)
        stop.set()
        t.join(timeout=35)
        assert statuses and all(code == 200 for _, code, _ in statuses), [s for s in statuses if s[1] != 200][:3]
        versions = [v for _, _, v in statuses]
        assert versions[0] == v1_version and versions[-1] == v2_version
        # The old version kept answering while the new replica started: no gap in service.
        assert any(update_started < t < update_done and v == v1_version for t, _, v in statuses)
        assert http.get(f"{base}/healthz", timeout=10).json()["model"]["version"] == v2_version
        assert http.get(f"{base}/model", timeout=10).json()["teacher"]["seed"] == 1
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()


# ----------------------------------------------------------------------------------------------------------------
# The shipped Serve config file and its application builder (no cluster needed)


def test_shipped_serve_yaml_is_a_valid_serve_config_that_builds_the_app(ckpt):
    import yaml
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[1] / "configs" / "serve.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.http_options.host == "127.0.0.1"
    (app_cfg,) = schema.applications
    builder = import_attr(app_cfg.import_path)
    app = builder({**app_cfg.args, "checkpoint": str(ckpt)})  # the shipped path is a placeholder
    deployment = app._bound_deployment
    assert deployment.max_ongoing_requests >= ServeConfig().max_batch_size  # batches can fill
    assert deployment.ray_actor_options["num_cpus"] == ServeConfig().num_cpus
    autoscaling = deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (ServeConfig().min_replicas,
                                                                    ServeConfig().max_replicas)
    assert deployment._deployment_config.max_surge_percent > 0  # rolling updates keep old replicas serving
    with pytest.raises(ConfigError, match="max_batchsize"):
        builder({"checkpoint": str(ckpt), "serve": {"max_batchsize": 8}})
    with pytest.raises(ConfigError, match="unknown keys"):
        builder({"checkpoint": str(ckpt), "port": 1})
    with pytest.raises(CheckpointError, match="does not exist"):
        builder({"checkpoint": str(ckpt.parent / "missing")})


# ----------------------------------------------------------------------------------------------------------------
# Before Ray: checkpoint checks, the ingress environment, the body middleware (no cluster needed)


def test_missing_checkpoint_names_the_checkpoints_of_the_run(tmp_path, capsys):
    from kdray.cli import main

    make_checkpoint(tmp_path / "runs" / "default" / "student")
    make_checkpoint(tmp_path / "runs" / "default" / "teacher")
    code = main(["serve", "--checkpoint", str(tmp_path / "runs/default/best"), f"runs_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and "best does not exist" in err
    assert "runs/default/student" in err and "runs/default/teacher" in err
    code = main(["serve", "--checkpoint", str(tmp_path / "nope"), f"runs_dir={tmp_path / 'empty'}"])
    assert code == 2 and "no checkpoints under" in capsys.readouterr().err


def test_empty_weights_file_is_refused_with_a_reason_before_ray_starts(tmp_path, capsys, monkeypatch):
    from kdray import cli
    from kdray.cli import main

    monkeypatch.setattr(cli, "init_ray", lambda *a, **k: pytest.fail("Ray started before the checkpoint check"))

    ckpt = make_checkpoint(tmp_path / "student")
    (ckpt / "model.pt").write_bytes(b"")
    assert main(["serve", "--checkpoint", str(ckpt), f"runs_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "model.pt cannot be loaded: the file is empty (0 bytes)" in err
    (ckpt / "model.pt").write_bytes(b"\x00" * 10)  # truncated: torch's message is the reason
    assert main(["serve", "--checkpoint", str(ckpt), f"runs_dir={tmp_path}"]) == 2
    assert "cannot be loaded: " in (err := capsys.readouterr().err) and not err.rstrip().endswith(":")


@pytest.mark.parametrize("mode", ["proxy", "direct", "haproxy"])
def test_ingress_env_selects_the_serve_mode(mode, monkeypatch):
    from kdray.serve.ingress import ingress_env

    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    env = ingress_env(ServeConfig(ingress=mode, body_timeout_s=2.5))
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "kdray.serve.ingress:http_middlewares"
    assert env["KDRAY_SERVE_BODY_TIMEOUT_S"] == "2.5"
    assert ("RAY_SERVE_ENABLE_DIRECT_INGRESS" in env) == (mode != "proxy")
    assert ("RAY_SERVE_ENABLE_HA_PROXY" in env) == (mode == "haproxy")
    if mode == "haproxy":  # its fixed ports (8404, 9101, 8500) would clash with another Serve on the machine
        assert int(env["RAY_SERVE_HAPROXY_STATS_PORT"]) not in (8404, 8500, 9101)


def test_haproxy_mode_without_a_binary_says_how_to_get_one(monkeypatch, tmp_path):
    from kdray.serve.ingress import ingress_env

    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "no-haproxy"))
    with pytest.raises(ConfigError, match="apt-get install haproxy"):
        ingress_env(ServeConfig(ingress="haproxy"))
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in ingress_env(ServeConfig(ingress="proxy"))
    with pytest.raises(ConfigError, match="serve.ingress"):
        from kdray.config import from_dict

        from_dict({"serve": {"ingress": "nginx"}})


def test_buffered_body_replays_a_whole_body_and_times_out_a_partial_one():
    import asyncio

    from kdray.serve.ingress import BufferedBody

    async def app(scope, receive, send):  # echoes the body it reads
        message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": message["body"]})

    def run(chunks: list[dict]) -> list[dict]:
        sent: list[dict] = []

        async def receive():
            if chunks:
                return chunks.pop(0)
            await asyncio.sleep(10)  # a client that stops sending

        async def send(message):
            sent.append(message)

        asyncio.run(BufferedBody(app, timeout_s=0.2)({"type": "http"}, receive, send))
        return sent

    whole = run([{"type": "http.request", "body": b"ab", "more_body": True},
                 {"type": "http.request", "body": b"c", "more_body": False}])
    assert whole[0]["status"] == 200 and whole[1]["body"] == b"abc"
    t0 = time.monotonic()
    partial = run([{"type": "http.request", "body": b"{", "more_body": True}])
    assert partial[0]["status"] == 408 and b"serve.body_timeout_s" in partial[1]["body"]
    assert time.monotonic() - t0 < 2
    assert run([{"type": "http.disconnect"}]) == []  # a client gone before its body: nothing to answer


@pytest.mark.ray
@pytest.mark.slow
def test_kdray_serve_console_readme_curl_and_sigterm(tmp_path):
    """``kdray serve`` as a user runs it (its own local cluster): only kdray's lines on the console, the README's
    curl example answered verbatim (on a free port instead of 8000), and SIGTERM stopping it as Ctrl-C does."""
    import os
    import re
    import shutil
    import signal
    import subprocess
    import sys

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    (curl,) = [line.split("  #")[0].strip() for line in readme.splitlines() if line.startswith("curl -s localhost:8000")]
    ckpt = make_checkpoint(tmp_path / "runs" / "default" / "student")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(repo), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "kdray.cli", "serve", "--checkpoint", str(ckpt),
                             f"runs_dir={tmp_path / 'runs'}", f"serve.port={port}", "serve.num_cpus=0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        while not any("kdray: serving" in line for line in lines):
            line = proc.stdout.readline()
            assert line, f"kdray serve exited: {lines}"
            lines.append(line)
        answer = subprocess.run(curl.replace("localhost:8000", f"localhost:{port}"), shell=True, capture_output=True,
                                text=True, timeout=30)
        assert '"items"' in answer.stdout and '"cold_start":true' in answer.stdout, answer  # "42" is unknown here
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    console = lines + rest.splitlines(keepends=True)
    assert proc.returncode == 0, console
    assert all(line.startswith("kdray: ") for line in console), console  # Ray's lines are in the log file
    assert "kdray: stopped\n" in console and not any(re.search("Traceback|http_options", x) for x in console)
    assert (tmp_path / "runs" / "default" / "logs" / "serve.log").stat().st_size > 0
