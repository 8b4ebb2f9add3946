"""Ray Serve endpoint over a checkpoint: a thin FastAPI adapter around :class:`kdray.predictor.Recommender`.

Routes (relative to ``serve.route_prefix``):

    POST /recommend        {"user_id": 42, "k": 10, "exclude_seen": true, "history": [50, "i9"]}
                           -> {"user_id", "items": [{"item_id", "score"}], "cold_start", "unknown_items",
                               "model": {"name", "version"}}
    POST /recommend/batch  {"user_ids": [42, "u7"], "k": 10, "exclude_seen": true, "histories": [[50], null]}
                           -> {"results": [{"user_id", "items", "cold_start", "unknown_items"}], "model": {...}}
    POST /predict          {"user_id": 42, "item_ids": [1, "7"], "features": {"occupation": "writer"}}
                           -> {"user_id", "predictions": [{"item_id", "probability", "rating"}], "model"}
                              (a pointwise checkpoint, task: pointwise; a ranking one answers /recommend instead)
    GET  /healthz          -> {"status": "ok", "model": {"name", "version"}}  (HEAD too: load balancers probe with it)
    GET  /model            -> architecture, parameters, metrics, creation time, teacher lineage, version, and the
                              answering replica's @serve.batch counters (batches, batched_requests)
    GET  /docs             OpenAPI (Swagger) page; the schema is at /openapi.json

``history`` (optional, at most serve.max_history raw item ids) is the user's recent items: the user vector is folded
in from it at request time (kdray.serve.foldin), its items are excluded with exclude_seen, and ids the catalog does
not know come back in ``unknown_items``. ``histories`` is the batch form: one history (or null) per user id.

Single requests go through ``@serve.batch``: concurrent requests on one replica are scored by one ``score_all`` call.
A POST body is read as JSON whatever its content type (``curl -d`` sends a form type). Client mistakes are 422 with
FastAPI's error shape (``detail[].loc`` names the field), never a 5xx; a body that is not JSON at all (invalid UTF-8,
nesting deeper than the parser allows, an integer over 4,300 digits) is a 400, and one that does not arrive within
``serve.body_timeout_s`` a 408 (:mod:`kdray.serve.ingress`, which also picks how requests reach the replicas).

Three ways to run it, all binding 127.0.0.1 unless told otherwise:

    kdray serve --checkpoint RUN/student [--address ADDR] [serve.port=8000 serve.ingress=haproxy ...]
    serve run configs/serve.yaml          # edit applications[0].args.checkpoint first
    serve deploy configs/serve.yaml       # onto a running cluster (the checkpoint must be readable on its nodes)

Running any of them again with another checkpoint under the same application name replaces the model in place: a
rolling update that starts the new replicas before the old ones stop (``max_surge_percent``), so requests keep
being answered, each naming the version that answered it. The cluster needs room for the surge: one more replica's
``num_cpus`` / ``num_gpus`` while the update runs (with none free, the update waits and the old version keeps serving).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations as objects, and Serve's
# ingress wrapper re-creates the methods where string annotations no longer resolve (a body becomes a query field).
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Union

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      StringConstraints)
from ray import serve
from ray.serve.handle import DeploymentHandle

from kdray import __version__
from kdray.checkpoint import load_checkpoint
from kdray.config import ServeConfig, from_dict
from kdray.errors import CheckpointError, ConfigError
from kdray.serve.ingress import ingress_env
from kdray.serve.pointwise import PointwisePredictor
from kdray.serve.predictor import Query, Recommendation, Recommender, RequestError, checkpoint_version

logger = logging.getLogger(__name__)

APP_NAME = "kdray"
# Extra replicas a rolling update may start, as a percentage of the target (rounded up to whole replicas): with a
# positive value Serve keeps the old replicas serving until their replacements are ready, instead of stopping them
# first (its default, 0, leaves a one-replica deployment with no replica while the new one loads).
ROLLING_UPDATE_SURGE_PERCENT = 25

# ----------------------------------------------------------------------------------------------------------------
# Request and response schemas (they are also the OpenAPI documentation at /docs)

MAX_ID_LENGTH = 256  # characters of a string id, digits of an integer id


def _short_int(value: int) -> int:
    if len(str(abs(value))) > MAX_ID_LENGTH:
        raise ValueError(f"an integer user id has at most {MAX_ID_LENGTH} digits")
    return value


UserId = Annotated[
    Union[Annotated[StrictInt, AfterValidator(_short_int)],
          Annotated[StrictStr, StringConstraints(max_length=MAX_ID_LENGTH)]],
    Field(description="raw user id as in the training data; an int is looked up as its decimal string"),
]
K = Annotated[StrictInt, Field(ge=1, description="number of items to return (at most the catalog and serve.max_k)")]
ExcludeSeen = Annotated[StrictBool, Field(description="leave out the items the user interacted with in training")]
ItemId = Union[StrictInt, Annotated[StrictStr, StringConstraints(max_length=256)]]
History = Annotated[list[ItemId], Field(description="the user's recent raw item ids (at most serve.max_history), "
                                                    "folded into the user vector at request time")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422, not silently ignored


class RecommendRequest(_Strict):
    user_id: UserId
    k: K = 10
    exclude_seen: ExcludeSeen = True
    history: Union[History, None] = None


class BatchRequest(_Strict):
    user_ids: list[UserId] = Field(min_length=1, description="at most serve.max_request_batch users")
    k: K = 10
    exclude_seen: ExcludeSeen = True
    histories: Union[list[Union[History, None]], None] = Field(
        None, description="one history (or null) per user id, in the same order")


class ItemScore(BaseModel):
    item_id: str
    score: float = Field(description="model logit; for a cold-start user, the item's training interaction count")


class ModelRef(BaseModel):
    name: str
    version: str = Field(description="short content hash of the checkpoint (meta.json + model.pt)")


class UserRecommendations(BaseModel):
    user_id: Union[int, str]
    items: list[ItemScore]
    cold_start: bool = Field(description="unknown user: the most popular items instead of personal ones")
    unknown_items: list[str] = Field(default_factory=list,
                                     description="history item ids the model does not know (ignored)")


class RecommendResponse(UserRecommendations):
    model: ModelRef


class BatchResponse(BaseModel):
    results: list[UserRecommendations]
    model: ModelRef


class Health(BaseModel):
    status: str
    model: ModelRef


def _user_dict(rec: Recommendation) -> dict[str, Any]:
    return {
        "user_id": rec.user_id,
        "items": [{"item_id": i, "score": s} for i, s in zip(rec.item_ids, rec.scores)],
        "cold_start": rec.cold_start,
        "unknown_items": rec.unknown_items,
    }


def _unprocessable(field: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, so clients parse one error format."""
    return HTTPException(status_code=422, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


# ----------------------------------------------------------------------------------------------------------------
# The pointwise task's POST /predict (kdray.serve.pointwise): its schemas, and the predictor a checkpoint loads as.

ItemId = Annotated[
    Union[StrictInt, Annotated[StrictStr, StringConstraints(max_length=256)]],
    Field(description="raw item id as in the training data; an int is looked up as its decimal string"),
]
FeatureValues = dict[Annotated[StrictStr, StringConstraints(max_length=256)],
                     Union[StrictInt, StrictFloat, Annotated[StrictStr, StringConstraints(max_length=256)]]]


class PredictRequest(_Strict):
    user_id: UserId
    item_ids: list[ItemId] = Field(min_length=1, description="at most serve.max_request_batch items")
    features: Union[FeatureValues, None] = Field(
        default=None, description="feature values for every item of the request (categorical: string; numeric: "
                                  "number); unnamed fields take the user's / item's own values")


class ItemPrediction(BaseModel):
    item_id: str
    probability: float = Field(description="P(the user likes the item), the like head's sigmoid")
    rating: Union[float, None] = Field(description="predicted rating (null without a rating head)")


class PredictResponse(BaseModel):
    user_id: Union[int, str]
    predictions: list[ItemPrediction]
    model: ModelRef


class _RankingOnly(PointwisePredictor):
    """A pointwise predictor that answers the ranking routes with a 422 naming the route to use."""

    def check_k(self, k: int) -> None:
        raise RequestError("k", "this endpoint serves a pointwise checkpoint (task: pointwise): use POST /predict")


def _load_predictor(checkpoint_dir: str, device: str, serve_cfg: ServeConfig) -> Union[Recommender, PointwisePredictor]:
    """The checkpoint's predictor: :class:`PointwisePredictor` for a pointwise model, else :class:`Recommender`."""
    ckpt = load_checkpoint(checkpoint_dir, map_location=device)
    if ckpt.features is not None:
        return _RankingOnly(ckpt, version=checkpoint_version(checkpoint_dir), device=device,
                            max_items=serve_cfg.max_request_batch)
    return Recommender(ckpt, version=checkpoint_version(checkpoint_dir), device=device, max_k=serve_cfg.max_k,
                       max_history=serve_cfg.max_history)


def _predict(predictor: Union[Recommender, PointwisePredictor], body: PredictRequest) -> list[dict[str, Any]]:
    if not isinstance(predictor, PointwisePredictor):
        raise _unprocessable("item_ids", "this endpoint serves a ranking checkpoint: use POST /recommend")
    try:
        preds = predictor.predict(body.user_id, body.item_ids, body.features)
    except RequestError as e:
        raise _unprocessable(e.field, e.message) from None
    return [{"item_id": p.item_id, "probability": p.probability, "rating": p.rating} for p in preds]


# ----------------------------------------------------------------------------------------------------------------
# The deployment. Serve's ingress decorator needs the FastAPI object when the class is defined, hence module level.

api = FastAPI(
    title="kdray recommender",
    version=__version__,
    description="Top-K recommendations from a distilled kdray student (or any kdray checkpoint).",
)


class JsonBody:
    """ASGI middleware: a POST body is JSON whatever content type the client named. ``curl -d`` sends
    ``application/x-www-form-urlencoded``, which FastAPI would parse as a form and refuse with "Input should be a
    valid dictionary"; the API has no form routes, so the header is rewritten instead."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


api.add_middleware(JsonBody)


def _json_safe(value: Any) -> Any:
    """``value`` with what JSON (UTF-8, finite numbers) cannot carry made printable: a lone surrogate in a string
    becomes its escape, NaN and infinities their repr, anything else unknown its str."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {_json_safe(str(k)): _json_safe(v) for k, v in value.items()}
    return _json_safe(str(value))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 shape (``detail[].loc`` names the field, ``msg`` says what is wrong) without the echo of the
    offending ``input``: FastAPI's own handler echoes it and then fails with a 500 on what JSON cannot encode (a
    lone UTF-16 surrogate, which ``json.loads`` accepts from ``"\\ud800"``; a NaN or Infinity, which it accepts
    bare), and it would send a multi-megabyte bad value straight back."""
    detail = [{key: _json_safe(err[key]) for key in ("type", "loc", "msg", "ctx") if key in err}
              for err in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": detail})


@serve.deployment(name="Recommender")
@serve.ingress(api)
class RecommenderDeployment:
    """One replica: loads the checkpoint once, answers HTTP requests, batches concurrent single-user requests."""

    def __init__(self, checkpoint_dir: str, serve_cfg: ServeConfig) -> None:
        # Torch would otherwise start one thread per core of the node and fight the other replicas for them.
        torch.set_num_threads(max(1, int(serve_cfg.num_cpus)))
        device = "cuda" if serve_cfg.num_gpus > 0 else "cpu"
        self.predictor = _load_predictor(checkpoint_dir, device, serve_cfg)  # ranking or pointwise (POST /predict)
        self.max_request_batch = serve_cfg.max_request_batch
        self.model_ref = {"name": self.predictor.name, "version": self.predictor.version}
        self.batches = self.batched_requests = 0  # evidence that @serve.batch forms batches (GET /model)
        self._recommend_batched.set_max_batch_size(serve_cfg.max_batch_size)
        self._recommend_batched.set_batch_wait_timeout_s(serve_cfg.batch_wait_timeout_s)
        logger.info("serving %s version %s from %s on %s", self.predictor.name, self.predictor.version,
                    checkpoint_dir, device)

    def _check_k(self, k: int, histories: Any = ()) -> None:
        try:
            self.predictor.check_k(k)
            for history in histories or ():
                self.predictor.check_history(history)
        except RequestError as e:
            raise _unprocessable(e.field, e.message) from None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # replaced from ServeConfig in __init__
    async def _recommend_batched(self, queries: list[Query]) -> list[Recommendation]:
        self.batches += 1
        self.batched_requests += len(queries)
        return self.predictor.recommend_queries(queries)

    @api.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, body: RecommendRequest) -> dict[str, Any]:
        self._check_k(body.k, [body.history])  # before batching: one bad request must not fail the batch it would join
        rec = await self._recommend_batched(Query(body.user_id, body.k, body.exclude_seen, body.history))
        return {**_user_dict(rec), "model": self.model_ref}

    @api.post("/recommend/batch", response_model=BatchResponse)
    async def recommend_batch(self, body: BatchRequest) -> dict[str, Any]:
        if len(body.user_ids) > self.max_request_batch:
            raise _unprocessable("user_ids", f"{len(body.user_ids)} users is more than the limit of "
                                             f"{self.max_request_batch} per request (serve.max_request_batch)")
        histories = body.histories if body.histories is not None else [None] * len(body.user_ids)
        if len(histories) != len(body.user_ids):
            raise _unprocessable("histories", f"{len(histories)} histories for {len(body.user_ids)} user ids; send "
                                              "one per user id (null for none)")
        self._check_k(body.k, histories)
        recs = self.predictor.recommend_queries([Query(u, body.k, body.exclude_seen, h)
                                                 for u, h in zip(body.user_ids, histories)])
        return {"results": [_user_dict(r) for r in recs], "model": self.model_ref}

    @api.post("/predict", response_model=PredictResponse)
    async def predict(self, body: PredictRequest) -> dict[str, Any]:
        return {"user_id": body.user_id, "predictions": _predict(self.predictor, body), "model": self.model_ref}

    @api.api_route("/healthz", methods=["GET", "HEAD"], response_model=Health)
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_ref}

    @api.get("/model")
    async def model_info(self) -> dict[str, Any]:
        """The checkpoint's description, plus this replica's batching counters (``replica``)."""
        replica = {"batches": self.batches, "batched_requests": self.batched_requests}
        return {**self.predictor.info(), "replica": replica}


# ----------------------------------------------------------------------------------------------------------------
# Building and running the application


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve deployment options from the kdray serve config: batching capacity, autoscaling, per-replica resources."""
    return {
        # Serve sends a replica at most this many requests at once; @serve.batch can only fill a batch of
        # max_batch_size if it is at least that (config validation enforces it).
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        },
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "max_surge_percent": ROLLING_UPDATE_SURGE_PERCENT,
    }


def check_checkpoint(checkpoint_dir: str | Path) -> Path:
    """Loads the checkpoint once, without Ray, and returns its absolute path: a missing or corrupt one raises a
    :class:`kdray.errors.CheckpointError` naming the file and the reason, instead of failing every replica start."""
    path = Path(checkpoint_dir).expanduser().resolve()
    weights = path / "model.pt"
    if weights.is_file() and weights.stat().st_size == 0:
        raise CheckpointError(f"checkpoint weights {weights} cannot be loaded: the file is empty (0 bytes), so the "
                              "checkpoint was not written completely; export or train it again")
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        if str(e).endswith(": "):  # a loader error without a message of its own
            raise CheckpointError(f"{e}the file is truncated or not a kdray checkpoint") from None
        raise
    return path


def build_app(checkpoint_dir: str | Path, serve_cfg: ServeConfig = ServeConfig()) -> serve.Application:
    """The Serve application for one checkpoint (for ``serve.run``; ``serve run`` YAML files use
    :func:`app_builder`), checked first by :func:`check_checkpoint`."""
    path = check_checkpoint(checkpoint_dir)
    return RecommenderDeployment.options(**deployment_options(serve_cfg)).bind(str(path), serve_cfg)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for Serve config files (``import_path: kdray.serve.app:app_builder``); Serve passes the
    application's ``args``:

        checkpoint: the checkpoint directory (required; relative paths resolve against the working directory)
        serve:      optional overrides of kdray's serve config (max_batch_size, max_k, min_replicas, num_cpus, ...)

    Host, port and route prefix come from the Serve config file itself (``http_options``, ``route_prefix``).
    """
    unknown = set(args) - {"checkpoint", "serve"}
    if unknown:
        raise ConfigError(f"serve application args: unknown keys {sorted(unknown)}; allowed: checkpoint, serve")
    if not args.get("checkpoint"):
        raise ConfigError("serve application args: 'checkpoint' (the checkpoint directory) is required")
    cfg = from_dict({"serve": dict(args.get("serve") or {})}).serve
    return build_app(args["checkpoint"], cfg)


def _interrupt_on_sigterm() -> None:
    """SIGTERM (``docker stop``, systemd) stops the endpoint as Ctrl-C does; Ray's own handler would exit at once."""
    if threading.current_thread() is threading.main_thread():
        def handler(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, handler)


def serve_checkpoint(ckpt_dir: Path, cfg: ServeConfig, blocking: bool = True) -> DeploymentHandle:
    """Deploys ``ckpt_dir`` as the application ``kdray`` on the connected Ray cluster, listening on
    ``cfg.host:cfg.port`` through ``cfg.ingress``. If the application is already running, this is a zero-downtime
    model update.

    With ``blocking`` it serves until interrupted (Ctrl-C or SIGTERM), then deletes the application; otherwise it
    returns as soon as the new version is live and leaves it running."""
    app = build_app(ckpt_dir, cfg)
    # HTTP options and the ingress mode (environment of the Serve controller, which its proxies and replicas
    # inherit) apply when Serve starts on a cluster; a Serve instance already running keeps its own.
    serve.start(http_options={"host": cfg.host, "port": cfg.port},
                controller_options={"runtime_env": {"env_vars": ingress_env(cfg)}})
    handle = serve.run(app, name=APP_NAME, route_prefix=cfg.route_prefix)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    print(f"kdray: serving {ckpt_dir} at {url}/recommend (API docs: {url}/docs, ingress: {cfg.ingress})", flush=True)
    if blocking:
        _interrupt_on_sigterm()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            # Not waiting for the replicas to drain: a cluster started by this process ends with it, and on a
            # cluster of its own the controller finishes the deletion.
            print("kdray: stopping the endpoint", flush=True)
            serve.delete(APP_NAME, _blocking=False)
            print("kdray: stopped", flush=True)
    return handle
