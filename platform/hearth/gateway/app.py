"""The HTTP gateway (aiohttp): invoke functions, admin API, publish to streams, metrics, health.

Every error is JSON ``{"error", "detail"}`` with the right status. Request bodies are streamed
straight into a shared-memory slot (one copy from aiohttp's buffer), and only a descriptor goes
to the instance."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import yaml
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hearth.dataplane.slots import PayloadTooLarge, PoolExhausted
from hearth.gateway.body import BodyLimits, BodyRejected, read_body
from hearth.gateway.fastpath import FastPath
from hearth.gateway.openapi import OPENAPI
from hearth.gateway.route import InvokeRoute, bearer, passed_headers, same
from hearth.gateway.shed import add_shedding, overloaded
from hearth.gateway.sojourn import READ_STAMPS, TAP, ReadStamps
from hearth.invoke import InvokeError
from hearth.node import NodeAgent, SlotPayload
from hearth.registry import Registry
from hearth.sdk import JSON
from hearth.spec import SpecError, parse_spec

log = logging.getLogger("hearth.gateway")

AGENT = web.AppKey("agent", NodeAgent)
REGISTRY = web.AppKey("registry", Registry)
SETTINGS = web.AppKey("settings", dict)
HOOKS = web.AppKey("hooks", dict)
ROUTE = web.AppKey("invoke_route", InvokeRoute)


def jerror(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status, headers=headers)


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        if request.match_info.http_exception is e:  # no route: say which, and what is allowed
            return _no_route(request, e)
        reason = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            e.status, "http_error"
        )
        return jerror(e.status, reason, e.text or e.reason or "")
    except InvokeError as e:
        retry = {"Retry-After": str(e.retry_after)} if getattr(e, "retry_after", None) else None
        return jerror(e.status, e.error, e.detail, retry)
    except Exception as e:  # a bug: answer 500 as JSON, keep serving
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jerror(500, "internal_error", f"{type(e).__name__}: {e}")


def _no_route(request: web.Request, e: web.HTTPException) -> web.Response:
    """A request no route takes: 405 with the route's methods (and the Allow header it must
    carry), or 404 saying why the path is not one of the API's."""
    where = f"{request.method} {request.path[:200]}"
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        detail = f"{where}: this path takes {allowed}"
        return jerror(405, "method_not_allowed", detail, {"Allow": allowed})
    why = "not a path of this API (see /openapi.json)"
    if request.path.startswith("/v1/functions/"):
        why = (
            "a function name is 1-63 lowercase letters, digits and '-' (/v1/functions/NAME:invoke)"
        )
    elif request.path.startswith("/v1/streams/"):
        why = "a stream name has no ':' or '/' (/v1/streams/STREAM:publish)"
    return jerror(404, "not_found", f"{where}: {why}")


def require_admin(request: web.Request) -> web.Response | None:
    token = request.app[SETTINGS]["admin_token"]
    got = bearer(request.headers)
    if got is None:
        return jerror(
            401,
            "unauthorized",
            "admin endpoints need 'Authorization: Bearer <admin token>'",
            {"WWW-Authenticate": "Bearer"},
        )
    if not same(got, token):
        return jerror(403, "forbidden", "the admin token is not valid")
    return None


async def invoke(request: web.Request) -> web.StreamResponse:
    """aiohttp's way to the invoke route (`gateway.route` holds its rules; `gateway.fastpath`
    serves the simple warm call without this handler)."""
    name = request.match_info["name"]
    route = request.app[ROUTE]
    # waited past the node's bound since the gateway read it: 503 now (see gateway.sojourn)
    received_at = request.app[READ_STAMPS].received_at(request)
    is_async = "respond-async" in request.headers.get("Prefer", "")
    timeout = None
    if request.query_string:  # most invokes have none: no query to parse
        is_async = _async_param(request) or is_async
        timeout = _timeout_param(request)  # before the body takes a slot: a 400 holds nothing
    deny = route.admit(name, request.headers, request.content_length, received_at, is_async)
    if deny is not None:
        return deny.response()
    agent = request.app[AGENT]
    limits: BodyLimits = request.app[SETTINGS]["body_limits"]
    ctype = request.headers.get("Content-Type", "application/octet-stream")
    try:
        payload = await read_body(request, agent.pool, limits)
    except BodyRejected as e:
        return route.body_refused(e).response()
    except PayloadTooLarge as e:
        return jerror(413, "payload_too_large", str(e))
    except PoolExhausted as e:
        return jerror(
            429, "no_space", f"shared-memory pool exhausted, retry later: {e}", {"Retry-After": "1"}
        )
    refused = await route.checked(ctype, payload)
    if refused is not None:
        return refused.response()
    headers = passed_headers(request.headers)
    if is_async:
        return await _invoke_async(request, name, payload, ctype, headers)
    answer = await route.call(name, payload, ctype, headers, timeout, received_at)
    return answer.response()


MIN_TIMEOUT_S = 0.05  # shorter ones would only ever answer 504


_ASYNC = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}


def _async_param(request: web.Request) -> bool:
    """`?async=`: a value that is neither true nor false is refused (it ran the call sync)."""
    raw = request.query.get("async", "")
    if raw.lower() not in _ASYNC:
        raise web.HTTPBadRequest(text=f"async must be true or false (1/0, yes/no), not {raw!r}")
    return _ASYNC[raw.lower()]


def _timeout_param(request: web.Request) -> float | None:
    raw = request.query.get("timeout")
    if raw is None:
        return None
    try:
        t = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"timeout must be a number of seconds, not {raw!r}") from None
    if not MIN_TIMEOUT_S <= t <= 86_400:
        raise web.HTTPBadRequest(text=f"timeout must be in [{MIN_TIMEOUT_S:g}, 86400] seconds")
    return t


async def _invoke_async(
    request: web.Request,
    name: str,
    payload: SlotPayload | bytes,
    ctype: str,
    headers: dict[str, str],
) -> web.Response:
    hooks = request.app[HOOKS]
    if "enqueue" not in hooks:
        if isinstance(payload, SlotPayload):
            request.app[AGENT].pool.release(payload.slot.index, payload.slot.gen)
        return jerror(501, "not_available", "async invocations need the queue machinery (Redis)")
    if isinstance(payload, SlotPayload):
        agent = request.app[AGENT]
        body = bytes(payload.slot.buf[payload.offset : payload.offset + payload.length])
        agent.pool.release(payload.slot.index, payload.slot.gen)
    else:
        body = payload
    callback = request.query.get("callback") or request.headers.get("X-Hearth-Callback")
    if callback and not callback.startswith(("http://", "https://")):
        return jerror(400, "bad_callback", "callback must be an http(s) URL")
    inv = await hooks["enqueue"](name, body, ctype, headers, callback)
    return web.json_response(
        {"invocation_id": inv, "status": "pending", "result": f"/v1/invocations/{inv}"},
        status=202,
        headers={"Location": f"/v1/invocations/{inv}"},
    )


async def get_invocation(request: web.Request) -> web.Response:
    hooks = request.app[HOOKS]
    if "lookup" not in hooks:
        return jerror(501, "not_available", "async invocations need the queue machinery (Redis)")
    inv = request.match_info["id"]
    rec = await hooks["lookup"](inv)
    if rec is None:
        return jerror(
            404, "unknown_invocation", f"no invocation {inv!r} (unknown or its result expired)"
        )
    return web.json_response(rec)


async def list_functions(request: web.Request) -> web.Response:
    if (deny := require_admin(request)) is not None:
        return deny
    agent = request.app[AGENT]
    st = agent.status()["functions"]
    return web.json_response(
        {
            "functions": [
                {
                    **fs.spec.to_dict(),
                    "invoke_token": "***" if fs.spec.invoke_token else None,
                    "status": st.get(n),
                }
                for n, fs in sorted(agent.functions.items())
            ]
        }
    )


async def get_function(request: web.Request) -> web.Response:
    if (deny := require_admin(request)) is not None:
        return deny
    name = request.match_info["name"]
    fs = request.app[AGENT].functions.get(name)
    if fs is None:
        return jerror(404, "unknown_function", f"no function named {name!r} is deployed")
    return web.json_response(
        {
            **fs.spec.to_dict(),
            "invoke_token": "***" if fs.spec.invoke_token else None,
            "status": request.app[AGENT].status()["functions"][name],
        }
    )


async def deploy_function(request: web.Request) -> web.Response:
    if (deny := require_admin(request)) is not None:
        return deny
    raw = await request.read()
    ctype = request.headers.get("Content-Type", JSON).split(";")[0].strip().lower()
    try:
        data: Any = yaml.safe_load(raw) if "yaml" in ctype else json.loads(raw)
    except RecursionError:
        return jerror(400, "malformed_body", "spec is nested too deeply")
    except (ValueError, yaml.YAMLError) as e:
        return jerror(
            400, "malformed_body", f"spec is not valid {'YAML' if 'yaml' in ctype else 'JSON'}: {e}"
        )
    try:
        spec = parse_spec(data, "spec")
    except SpecError as e:
        return jerror(400, "invalid_spec", str(e))
    except RecursionError:
        return jerror(400, "invalid_spec", "spec is nested too deeply")
    if spec.refs():  # no agent can read Kubernetes Secrets: unresolved, the token would be open
        return jerror(
            400,
            "invalid_spec",
            "spec: env_value_from and invoke_token_secret_ref are resolved by the Kubernetes "
            "controller: deploy a Function resource, or give env / invoke_token here",
        )
    agent = request.app[AGENT]
    registry = request.app[REGISTRY]
    existed = spec.name in agent.functions
    async with registry.changing():  # after the registry sync's step in progress
        await registry.put(spec)
        await agent.deploy(spec)
        hooks = request.app[HOOKS]
        if "on_deploy" in hooks:
            await hooks["on_deploy"](spec)
    return web.json_response(
        {"deployed": spec.name, "created": not existed}, status=200 if existed else 201
    )


async def delete_function(request: web.Request) -> web.Response:
    if (deny := require_admin(request)) is not None:
        return deny
    name = request.match_info["name"]
    agent = request.app[AGENT]
    if name not in agent.functions:
        return jerror(404, "unknown_function", f"no function named {name!r} is deployed")
    registry = request.app[REGISTRY]
    async with registry.changing():
        await registry.delete(name)
        hooks = request.app[HOOKS]
        if "on_delete" in hooks:
            await hooks["on_delete"](name)
        await agent.undeploy(name)
    return web.json_response({"deleted": name})


async def publish(request: web.Request) -> web.Response:
    if (deny := require_admin(request)) is not None:
        return deny
    hooks = request.app[HOOKS]
    if "publish" not in hooks:
        return jerror(501, "not_available", "publishing needs Redis")
    stream = request.match_info["stream"]
    body = await request.read()
    try:
        entry = await hooks["publish"](
            stream, body, request.headers.get("Content-Type", "application/octet-stream")
        )
    except ValueError as e:
        return jerror(400, "bad_event", str(e))
    return web.json_response({"stream": stream, "id": entry}, status=201)


async def status(request: web.Request) -> web.Response:
    if (deny := require_admin(request)) is not None:
        return deny
    st = request.app[AGENT].status()
    hooks = request.app[HOOKS]
    if "status_extra" in hooks:
        st.update(await hooks["status_extra"]())
    return web.json_response(st)


async def coldstarts(request: web.Request) -> web.Response:
    if (deny := require_admin(request)) is not None:
        return deny
    hooks = request.app[HOOKS]
    recs = await hooks["coldstarts"]() if "coldstarts" in hooks else request.app[AGENT].cold_starts
    return web.json_response({"coldstarts": recs})


async def healthz(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    return web.json_response(
        {
            "status": "ok",
            "dataplane": agent.mode,
            "functions": len(agent.functions),
            "time": time.time(),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    # Scrapers authenticate like admins (Prometheus: `authorization.credentials_file`) or with
    # the read-only metrics token; the figures name functions and reveal traffic.
    mtok = request.app[SETTINGS].get("metrics_token")
    got = bearer(request.headers)
    if not (mtok and got is not None and same(got, mtok)):
        if (deny := require_admin(request)) is not None:
            return deny
    hooks = request.app[HOOKS]
    if "before_metrics" in hooks:
        await hooks["before_metrics"]()
    body = await asyncio.to_thread(generate_latest, request.app[AGENT].metrics.registry)
    return web.Response(
        body=body,
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


def make_app(
    agent: NodeAgent,
    registry: Registry,
    *,
    admin_token: str,
    max_body_bytes: int,
    hooks: dict[str, Any] | None = None,
    body_limits: BodyLimits | None = None,
    metrics_token: str | None = None,
    shed_lag_s: float | None = None,
) -> web.Application:
    def counted(detail: str) -> web.Response:
        agent.metrics.rejected.labels("overloaded").inc()
        return overloaded(detail)

    # client_max_size only bounds request.read() (admin bodies); invoke streams with its own limit.
    app = web.Application(middlewares=[errors], client_max_size=4 * 1024 * 1024)
    lag = add_shedding(app, shed_lag_s, counted)  # invokes: 503 while the loop is later than this
    lag.on_lag = agent.metrics.loop_lag.observe  # each tick's lateness on /metrics
    app[AGENT] = agent
    app[READ_STAMPS] = ReadStamps()  # filled when served through `gateway.sojourn.listen`
    app[REGISTRY] = registry
    app[SETTINGS] = {
        "admin_token": admin_token,
        "max_body_bytes": max_body_bytes,
        "body_limits": body_limits or BodyLimits(max_body_bytes=max_body_bytes),
        "metrics_token": metrics_token,
    }
    app[HOOKS] = hooks or {}
    route = app[ROUTE] = InvokeRoute(agent, admin_token, max_body_bytes)
    # the simple warm invoke, served by each connection's protocol without aiohttp's request
    # and response objects (same route, same answers: gateway.fastpath); used by `listen`
    limits = app[SETTINGS]["body_limits"]
    fast = FastPath(route, limits, lag, agent.metrics.rejected.labels("overloaded").inc)
    app[TAP] = fast.tap()
    app.on_shutdown.append(fast.drain)
    name = "{name:[a-z0-9][a-z0-9-]*}"
    app.router.add_post(f"/v1/functions/{name}:invoke", invoke)
    app.router.add_get("/v1/invocations/{id}", get_invocation)
    app.router.add_get("/v1/functions", list_functions)
    app.router.add_post("/v1/functions", deploy_function)
    app.router.add_get(f"/v1/functions/{name}", get_function)
    app.router.add_delete(f"/v1/functions/{name}", delete_function)
    app.router.add_post("/v1/streams/{stream:[^/:]+}:publish", publish)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/coldstarts", coldstarts)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app
