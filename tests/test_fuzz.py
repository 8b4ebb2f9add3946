"""Hostile input, fuzzed with hypothesis: the HTTP API, the data loaders and the config.

Each boundary has one property. The API never answers 5xx: a bad request is a 4xx whose ``detail`` says what is
wrong and, for a 422, names the field. A data file, however broken, loads or raises kdray's ``DataError`` naming
the file, never a bare pandas / pyarrow / numpy exception. A config, however wrong, loads or raises ``ConfigError``
naming the dotted key. The HTTP tests call the FastAPI app in-process through ASGI (one replica object, no Ray), so
hundreds of examples take seconds; tests/test_faults_serve.py sends the same kind of bodies to the live deployment.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import string
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from kdray.config import Config, DataConfig, load_config, to_dict
from kdray.data.prepare import prepare
from kdray.data.readers import load_raw
from kdray.errors import ConfigError, DataError
from kdray.serve.predictor import checkpoint_version

# KDRAY_FUZZ_SCALE=10 runs ten times the examples (a longer hunt than the test suite's ~10 s of them).
SCALE = float(os.environ.get("KDRAY_FUZZ_SCALE", "1"))


def fuzz(n: int) -> settings:
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ----------------------------------------------------------------------------------------------------------------
# The HTTP API, in-process


def _asgi_call(app, method: str, path: str, body: bytes = b"",
               content_type: bytes | None = b"application/json") -> tuple[int, bytes]:
    """One HTTP request through an ASGI app; returns (status, body). Exceptions the app lets escape propagate
    (under a real server they are 500s)."""
    headers = [(b"content-type", content_type)] if content_type is not None else []
    headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    status, chunks = [], []

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # no more body: the app only waits here for a disconnect

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    _LOOP.run_until_complete(app(scope, receive, send))
    return status[0], b"".join(chunks)


# One event loop for the module: @serve.batch binds its queue to the loop of its first call.
_LOOP = asyncio.new_event_loop()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """The Serve ingress app with one in-process replica (max_k=5, max_request_batch=3, a 10-item catalog)."""
    import ray.serve
    import torch

    from kdray.serve import app as kserve
    from kdray.config import ServeConfig
    from test_serve import make_checkpoint

    ckpt = make_checkpoint(tmp_path_factory.mktemp("fuzz") / "v1")
    threads = torch.get_num_threads()
    # serve.ingress subclasses the user class with an async __init__ (run by the replica); the plain class is the
    # next one in the MRO. Its routes find their `self` through serve.get_replica_context().servable_object.
    plain = kserve.RecommenderDeployment.func_or_class.__mro__[1]
    replica = plain(str(ckpt), ServeConfig(max_k=5, max_request_batch=3, max_batch_size=4, max_ongoing_requests=8))
    context = SimpleNamespace(servable_object=replica,
                              _deployment_config=SimpleNamespace(max_ongoing_requests=8))
    original = ray.serve.get_replica_context
    ray.serve.get_replica_context = lambda: context
    try:
        yield SimpleNamespace(app=kserve.api, version=checkpoint_version(ckpt))
    finally:
        ray.serve.get_replica_context = original
        torch.set_num_threads(threads)
        # @serve.batch keeps its queue (asyncio futures) in the decorated method's closure, created by the first call.
        # A replica is its own process, but here the class is shared with every later test that deploys it, and Ray
        # cannot pickle a class whose method holds a queue: drop it, as a fresh replica process would not have one.
        plain._recommend_batched.set_max_batch_size.__self__._queue = None


FIELDS = {"/recommend": ("user_id", "k", "exclude_seen"), "/recommend/batch": ("user_ids", "k", "exclude_seen")}

json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10 ** 300), max_value=10 ** 300)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
                | st.sampled_from(["u0", "7", "", " ", "\u0000", "é", "💥", "\U0010ffff", "nobody"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
field_values = {
    "user_id": json_values | st.integers() | st.sampled_from(["u0", "u1", 7, "7", "x" * 300]),
    "user_ids": json_values | st.lists(st.integers() | st.text(max_size=10) | json_values, max_size=6),
    "k": json_values | st.integers(min_value=-3, max_value=12) | st.integers() | st.just(10 ** 30),
    "exclude_seen": json_values | st.booleans(),
}


@st.composite
def request_bodies(draw) -> tuple[str, bytes]:
    """(route, body): a mostly well-formed object with hostile values, an arbitrary JSON value, or raw bytes."""
    route = draw(st.sampled_from(sorted(FIELDS)))
    kind = draw(st.sampled_from(["fields", "fields", "fields", "json", "bytes"]))
    if kind == "bytes":
        return route, draw(st.binary(max_size=200))
    if kind == "json":
        value = draw(json_values)
    else:
        keys = draw(st.lists(st.sampled_from(FIELDS[route]), unique=True))
        value = {key: draw(field_values[key]) for key in keys}
        value.update(draw(st.dictionaries(st.text(max_size=6), json_scalars, max_size=2)))  # unknown fields
    text = json.dumps(value, allow_nan=True)  # Python's json writes and reads NaN / Infinity; clients may too
    if draw(st.booleans()) and kind == "fields":
        text = text[:draw(st.integers(0, max(0, len(text) - 1)))]  # truncated JSON
    return route, text.encode("utf-8", "surrogatepass")


def _check_error_body(status: int, body: bytes, what: Any) -> list[dict]:
    assert 400 <= status < 500, (status, body[:300], what)
    detail = json.loads(body)["detail"]
    assert detail, (body, what)
    if status != 422:
        assert isinstance(detail, str) and detail, (body, what)
        return []
    assert isinstance(detail, list)
    for d in detail:
        assert d["msg"] and d["loc"] and d["loc"][0] == "body", (d, what)
    return detail


@fuzz(150)
@given(request=request_bodies())
@example(request=("/recommend", b'{"user_id": "\\ud800", "k": 2}'))  # lone surrogate: was a 500
@example(request=("/recommend", b'{"\\udfff": 1, "user_id": "u0"}'))  # ... in an unknown key's name
@example(request=("/recommend", b'{"user_id": NaN}'))  # NaN echoed into the 422: was a 500
@example(request=("/recommend/batch", b'{"user_ids": [Infinity, -1e400]}'))
@example(request=("/recommend", b'{"user_id": 1' + b"0" * 5000 + b"}"))  # past Python's int-parsing limit
@example(request=("/recommend", b'{"user_id": "u0", "k": 1' + b"0" * 4000 + b"}"))
@example(request=("/recommend", b"[" * 100_000))  # nesting deeper than the recursion limit
@example(request=("/recommend/batch", b'{"user_ids": []}'))
@example(request=("/recommend/batch", b'{"user_ids": ["u0", "u1", "u3", "u4"]}'))
def test_api_never_answers_5xx_and_names_the_field(api, request):
    route, body = request
    status, out = _asgi_call(api.app, "POST", route, body)
    if status == 200:
        payload = json.loads(body)
        reply = json.loads(out)
        assert reply["model"]["version"] == api.version
        results = [reply] if route == "/recommend" else reply["results"]
        k = payload.get("k", 10)
        assert all(len(r["items"]) <= k for r in results)
        return
    detail = _check_error_body(status, out, request)
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return  # not JSON: FastAPI says so (json_invalid), there is no field to name
    if isinstance(payload, dict) and detail:
        # every error points into the body at a field that was sent or is required
        named = {str(d["loc"][1]) for d in detail if len(d["loc"]) > 1}
        sent = {k.encode("utf-8", "backslashreplace").decode() for k in payload}
        assert named <= sent | set(FIELDS[route]), (named, payload)


@fuzz(60)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       path=st.sampled_from(["/healthz", "/model", "/recommend", "/recommend/batch", "/docs", "/openapi.json",
                             "/nope", "/recommend/", "//recommend"]),
       body=st.binary(max_size=50), content_type=st.sampled_from([b"application/json", b"text/plain", None]))
def test_every_route_and_method_is_answered_without_5xx(api, method, path, body, content_type):
    status, out = _asgi_call(api.app, method, path, body, content_type)
    assert status < 500, (method, path, status, out[:300])
    if status >= 400:
        _check_error_body(status, out, (method, path, body))


def test_validation_errors_name_the_field_and_do_not_echo_the_input(api):
    status, out = _asgi_call(api.app, "POST", "/recommend", b'{"user_id": "\\ud800", "k": NaN, "kk": 1}')
    assert status == 422
    detail = json.loads(out)["detail"]
    assert {tuple(d["loc"][:2]) for d in detail} == {("body", "user_id"), ("body", "k"), ("body", "kk")}
    assert all("input" not in d for d in detail)


# ----------------------------------------------------------------------------------------------------------------
# Data loaders

hostile = (st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
           | st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "1.5", "1e3", "1e400", "0x1F", "é", "💥", "u\"7",
                              "\"", "a,b", "9223372036854775808", "-9223372036854775809", "18446744073709551615",
                              "True", "-0", "+3", " 4", "1_000", "\x00"])
           | st.text(max_size=6))
# mostly small valid ids (so that some files load and reach prepare), one in ten hostile
ids = st.integers(0, 9).flatmap(lambda r: hostile if r == 0 else st.integers(min_value=1, max_value=12))
small = st.integers(min_value=1, max_value=9)
words = st.text(alphabet=string.ascii_letters + "é ", max_size=8)
U_DATA = [small] * 4  # user item rating timestamp
U_USER = [small, st.integers(10, 80), st.sampled_from("MF"), st.sampled_from(["artist", "doctor"]), words]
U_ITEM = [small, words, st.just("01-Jan-1995"), st.just(""), st.just("http://x"), *[st.sampled_from("01")] * 19]


@st.composite
def table_text(draw, columns: list, delimiter: str) -> bytes:
    """Rows of valid values (one strategy per column), each cell sometimes replaced by a hostile token and each row
    sometimes given the wrong width; sometimes the wrong delimiter, line ending or encoding; sometimes cut off."""
    sep = delimiter if draw(st.integers(0, 4)) else draw(st.sampled_from(["\t", ",", ";", "|", " ", "::", ""]))
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        width = len(columns) if draw(st.integers(0, 9)) else draw(st.integers(0, len(columns) + 2))
        lines.append(sep.join(str(draw(hostile) if not draw(st.integers(0, 11)) else draw(columns[j % len(columns)]))
                              for j in range(width)))
    end = draw(st.sampled_from(["\n"] * 4 + ["\r\n", "\r"]))
    text = end.join(lines) + draw(st.sampled_from(["", end, end * 2]))
    data = text.encode(draw(st.sampled_from(["utf-8"] * 5 + ["utf-16"])), "surrogatepass")
    if not draw(st.integers(0, 4)):
        data = data[:draw(st.integers(0, len(data)))]
    return data


def file_bytes(columns: list, delimiter: str) -> st.SearchStrategy[bytes]:
    return st.integers(0, 5).flatmap(lambda r: st.binary(max_size=120) if r == 0 else table_text(columns, delimiter))


def _assert_loads_or_names(cfg: DataConfig, *files: Path) -> None:
    """The property: load_raw gives equal-length arrays (and prepare then works or raises DataError), or raises
    DataError naming one of ``files``."""
    try:
        raw = load_raw(cfg)
    except DataError as e:
        event("DataError from load_raw")
        assert any(str(f) in str(e) or f.name in str(e) for f in files), str(e)
        return
    assert raw.users.shape == raw.items.shape and raw.users.size > 0
    try:
        prepare(cfg, Path(cfg.path if Path(cfg.path).is_dir() else Path(cfg.path).parent) / "prepared")
        event("loaded and prepared")
    except DataError as e:
        event("DataError from prepare")
        assert "no interactions left" in str(e) or any(str(f) in str(e) for f in files), str(e)


@pytest.fixture
def fresh(tmp_path_factory):
    """A new empty folder per hypothesis example (tmp_path is shared by all examples of one test)."""
    return lambda: tmp_path_factory.mktemp("ex", numbered=True)


@fuzz(120)
@given(data=file_bytes(U_DATA, "\t"), side_features=st.booleans())
@example(data=b"1\t2\t3\t4\n" + b"9" * 30 + b"\t2\t3\t4\n", side_features=False)  # id past int64
@example(data=b"1\t2\t3\t4\n1\t2\t3", side_features=False)  # truncated last line
@example(data=b"\xff\xfe1\x002\x00", side_features=False)
@example(data=b"1\t2\t3\t1e400\n", side_features=False)
def test_ml100k_u_data_fuzz(fresh, data, side_features):
    folder = fresh()
    (folder / "u.data").write_bytes(data)
    if side_features:
        (folder / "u.user").write_bytes(b"1|20|M|artist|1\n")
        (folder / "u.item").write_bytes(b"2|t|d||u|" + b"|".join([b"0"] * 19) + b"\n")
    cfg = DataConfig(source="ml-100k", path=str(folder), side_features=side_features)
    _assert_loads_or_names(cfg, folder / "u.data", folder / "u.user", folder / "u.item")


@fuzz(80)
@given(user=file_bytes(U_USER, "|"), item=file_bytes(U_ITEM, "|"))
@example(user=b"1|10|M|doctor|", item=b"")  # user 1 twice: was pandas' InvalidIndexError in prepare
@example(user=b"", item=b"3|t|d||u|" + b"|".join([b"1"] * 19) + b"\n")  # item 3 twice
def test_ml100k_side_feature_files_fuzz(fresh, user, item):
    folder = fresh()
    (folder / "u.data").write_bytes(b"1\t2\t3\t4\n1\t3\t3\t5\n")
    # rows for the rated user and items first, so that a file whose fuzzed rows are valid loads
    (folder / "u.user").write_bytes(b"1|20|M|artist|1\n" + user)
    (folder / "u.item").write_bytes(b"".join(b"%d|t|d||u|" % i + b"|".join([b"0"] * 19) + b"\n" for i in (2, 3))
                                    + item)
    _assert_loads_or_names(DataConfig(source="ml-100k", path=str(folder)), folder / "u.user", folder / "u.item")


@fuzz(120)
@given(train=st.lists(st.lists(ids, max_size=5), max_size=5) | st.binary(max_size=80),
       test=st.lists(st.lists(ids, max_size=4), max_size=4) | st.binary(max_size=80),
       sep=st.sampled_from([" ", "\t", "  ", ","]))
@example(train=[[1, 2, 3], [2 ** 64, 1]], test=[[1, 4]], sep=" ")  # id past int64
@example(train=[[1, 2]], test=[], sep=" ")  # empty test.txt
@example(train=[[1], [2]], test=[[3]], sep=" ")  # users without a single item: was an empty data set
def test_lightgcn_fuzz(fresh, train, test, sep):
    folder = fresh()
    for name, content in (("train.txt", train), ("test.txt", test)):
        data = content if isinstance(content, bytes) else \
            "\n".join(sep.join(map(str, line)) for line in content).encode("utf-8", "surrogatepass")
        (folder / name).write_bytes(data)
    cfg = DataConfig(source="lightgcn", path=str(folder), split="given", split_ratios=(0.8, 0.2, 0.0))
    _assert_loads_or_names(cfg, folder / "train.txt", folder / "test.txt")


CSV_VALID = {"user": small, "item": small | words, "rating": st.integers(1, 5) | st.floats(0, 5),
             "ts": st.integers(0, 2 ** 40) | st.sampled_from(["2020-01-01", "2021-06-30T12:00:00Z"])}


@fuzz(120)
@given(header=st.sampled_from([["user", "item", "rating", "ts"]] * 3 + [["user", "item"]]
                              + [["item", "user", "x"], ["user"], [], ["user", "user", "item"], ["User", "item"]])
       | st.lists(st.sampled_from(["user", "item", "rating", "ts", "x", "", "user "]) | st.text(max_size=5),
                  max_size=5),
       n_rows=st.integers(0, 6), data=st.data(),
       sep=st.sampled_from([","] * 4 + [";", "\t", "|"]), file_sep=st.sampled_from([","] * 4 + [";", "\t", "|"]),
       rating=st.sampled_from([None, "rating"]), timestamp=st.sampled_from([None, "ts"]),
       truncate=st.none() | st.none() | st.integers(0, 200))
def test_csv_with_column_map_fuzz(fresh, header, n_rows, data, sep, file_sep, rating, timestamp, truncate):
    path = fresh() / "interactions.csv"
    rows = [[data.draw(hostile) if not data.draw(st.integers(0, 11)) else data.draw(CSV_VALID.get(h, small))
             for h in header] for _ in range(n_rows)]
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=file_sep, lineterminator="\n")
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    text = buf.getvalue().encode("utf-8", "surrogatepass")
    path.write_bytes(text[:truncate] if truncate is not None else text)
    cfg = DataConfig(source="csv", path=str(path), sep=sep, rating_col=rating, timestamp_col=timestamp,
                     user_col="user", item_col="item")
    _assert_loads_or_names(cfg, path)


@pytest.mark.parametrize("text, expected", [
    # a column with a number past uint64 is read as text: its ids stay text, exactly as written, never wrapped
    ("user,item\na,1\nb,18446744073709551616\n", ["1", "18446744073709551616"]),
    ("user,item\na,1\nb,18446744073709551615\n", "line 3: item 18446744073709551615 is out of the 64-bit"),
    ("user,item\na,1.0\nb,1e19\n", "line 3: item 1e\\+19 is out of the 64-bit"),
    ("user,item,rating\n1,2,1e400\n", "line 2: rating is inf; expected a finite number"),
])
def test_csv_ids_past_int64_are_named_or_kept_as_text(tmp_path, text, expected):
    path = tmp_path / "i.csv"
    path.write_text(text)
    cfg = DataConfig(source="csv", path=str(path), rating_col="rating" if "rating" in text else None)
    if isinstance(expected, list):
        assert load_raw(cfg).items.tolist() == expected
    else:
        with pytest.raises(DataError, match=expected):
            load_raw(cfg)


GOOD_COLUMNS = {"user": pa.array([1, 2, 3], pa.int64()), "item": pa.array(["a", "b", "a"]),
                "rating": pa.array([1.0, 4.0, 5.0]), "ts": pa.array([3, 2, 1], pa.int64())}
HOSTILE_COLUMNS = [
    pa.array([1, None, 3], pa.int64()), pa.array([1.5, 2.0, 3.0]), pa.array([float("nan"), 1.0, 2.0]),
    pa.array([float("inf"), 1.0, 2.0]), pa.array(["a", "é", "💥"]), pa.array(["", None, "x"]),
    pa.array([True, False, True]), pa.array([2 ** 63 - 1, -(2 ** 63), 0], pa.int64()),
    pa.array([2 ** 64 - 1, 0, 1], pa.uint64()), pa.array([1e19, 1.0, 2.0]), pa.array([[1], [2, 3], []]),
    pa.array([b"\xff", b"a", b""], pa.binary()), pa.array([1, 2, 3], pa.timestamp("s")),
    pa.array([{"a": 1}, {"a": 2}, {"a": 3}]), pa.array([None, None, None], pa.null()),
    pa.array([1, 2, 3], pa.decimal128(10, 2)), pa.array([1, 2, 3], pa.date32()),
    pa.array(["x", "y", "x"]).dictionary_encode(), pa.array(["2020-01-01", "not a date", "2020-01-02"]),
]


@fuzz(120)
@given(names=st.lists(st.sampled_from(["user", "item", "rating", "ts", "other"]), unique=True, max_size=5)
       | st.just(["user", "item", "rating", "ts"]),
       replaced=st.dictionaries(st.sampled_from(["user", "item", "rating", "ts", "other"]),
                                st.sampled_from(HOSTILE_COLUMNS), max_size=2),
       rating=st.sampled_from([None, "rating"]), timestamp=st.sampled_from([None, "ts"]),
       damage=st.sampled_from([None, None, None, "truncate", "bytes", "empty"]), cut=st.integers(0, 400))
@example(names=["user", "item"], replaced={"item": HOSTILE_COLUMNS[11]}, rating=None, timestamp=None, damage=None,
         cut=0)  # binary ids: was a UnicodeDecodeError from pandas
@example(names=["user", "item"], replaced={"user": HOSTILE_COLUMNS[8]}, rating=None, timestamp=None, damage=None,
         cut=0)  # uint64 past int64: was silently wrapped to -1
def test_parquet_with_column_map_fuzz(fresh, names, replaced, rating, timestamp, damage, cut):
    path = fresh() / "interactions.parquet"
    columns = {name: replaced.get(name, GOOD_COLUMNS.get(name, pa.array([0, 0, 0]))) for name in names}
    pq.write_table(pa.table(columns) if columns else pa.table({"other": pa.array([], pa.int64())}), path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:cut])
    elif damage == "bytes":
        path.write_bytes(bytes(range(256))[cut % 256:])
    elif damage == "empty":
        path.write_bytes(b"")
    cfg = DataConfig(source="parquet", path=str(path), rating_col=rating, timestamp_col=timestamp)
    _assert_loads_or_names(cfg, path)


# ----------------------------------------------------------------------------------------------------------------
# Config

_DEFAULTS = to_dict(Config())
keys = st.sampled_from(sorted(_DEFAULTS) + [f"{s}.{k}" for s, v in _DEFAULTS.items() if isinstance(v, dict)
                                            for k in v] + ["nope", "data.nope", "serve.port.x", "data..path", ""])
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10 ** 400), max_value=10 ** 400)
    | st.floats() | st.text(max_size=10) | st.sampled_from(["mf", "rd", "random", "csv", "1e-3", "inf", ".nan"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | st.integers(), inner,
                                                                max_size=3),
    max_leaves=8)


def _dump(value: Any, **kw: Any) -> str:
    """yaml.safe_dump, also of ints past Python's 4300-digit str() limit (which the loader must then refuse)."""
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return yaml.safe_dump(value, **kw)
    finally:
        sys.set_int_max_str_digits(limit)


def _leaf_names(tree: Any, prefix: str = "") -> set[str]:
    names = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            names.add(str(k))
            names |= _leaf_names(v, f"{prefix}{k}.")
    return names


def _assert_config_loads_or_names(path: Path | None, overrides: list[str], keys_used: set[str]) -> None:
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        event("ConfigError")
        message = str(e)
        assert message, "an empty ConfigError"
        # it names a key (dotted, or one part of it) that was given, or the file / override that is broken
        assert any(k and k in message for k in keys_used) or "config file" in message or "override" in message \
            or "name:" in message or "student.dim" in message or "distill." in message, message
        return
    event("loaded")
    assert isinstance(cfg, Config)


@fuzz(200)
@given(entries=st.lists(st.tuples(keys, yaml_values), max_size=5))
@example(entries=[("data.n_users", 10 ** 400)])  # an int no float can hold, where a float is expected: fine
@example(entries=[("distill.alpha", 10 ** 400)])
@example(entries=[("data", {1: 2, "x": 3})])  # unknown keys of mixed types
@example(entries=[("serve.max_k", 2 ** 80)])  # an int past int64: was accepted
@example(entries=[("data.seed", 10 ** 4400)])  # past Python's int-parsing limit: was a bare ValueError
def test_config_overrides_fuzz(entries):
    overrides, keys_used = [], set()
    for key, value in entries:
        text = _dump(value, default_flow_style=True, width=10 ** 6).strip()
        if text.endswith("\n..."):
            text = text[: -len("\n...")]
        text = text.removesuffix("...").strip()
        overrides.append(f"{key}={text}")
        keys_used |= {key, *key.split(".")} | _leaf_names(value)
    _assert_config_loads_or_names(None, overrides, keys_used)


@fuzz(150)
@given(tree=st.dictionaries(st.sampled_from(sorted(_DEFAULTS)) | st.text(max_size=5),
                            yaml_values | st.dictionaries(st.sampled_from(sorted({k for v in _DEFAULTS.values()
                                                                                  if isinstance(v, dict)
                                                                                  for k in v})) | st.text(max_size=4),
                                                          yaml_values, max_size=4), max_size=4),
       damage=st.sampled_from([None, None, "truncate", "bytes", "latin-1"]), cut=st.integers(0, 300))
@example(tree={}, damage="bytes", cut=1)  # not UTF-8: was a UnicodeDecodeError
@example(tree={"data": {"seed": 10 ** 4400}}, damage=None, cut=0)
def test_config_yaml_file_fuzz(fresh, tree, damage, cut):
    path = fresh() / "c.yaml"
    text = _dump(tree, allow_unicode=True)
    data = text.encode("utf-8", "surrogatepass")
    if damage == "truncate":
        data = data[:cut]
    elif damage == "bytes":
        data = bytes(range(256))[cut % 256:] + data
    elif damage == "latin-1":
        data = text.encode("latin-1", "replace") + "é: ü\n".encode("latin-1")
    path.write_bytes(data)
    _assert_config_loads_or_names(path, [], _leaf_names(tree) | {"c.yaml"})
