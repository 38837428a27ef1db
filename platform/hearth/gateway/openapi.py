"""The gateway's OpenAPI document (served at /openapi.json; a copy is kept in docs/openapi.json
and a test keeps the two equal)."""

from __future__ import annotations

from typing import Any

_ERR = {
    "description": "Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_ADMIN = [{"adminToken": []}]
_BUSY = {
    "description": "Back-pressure: retry after the Retry-After header's seconds",
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _errs(*codes: int) -> dict[str, Any]:
    return {str(c): _ERR for c in codes}


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "Hearth gateway",
        "version": "0.1.0",
        "description": "Invoke functions, manage them, publish events. Errors are JSON {error, detail}.",
    },
    "servers": [{"url": "http://127.0.0.1:8080"}],
    "components": {
        "securitySchemes": {
            "adminToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "Admin token: printed by `hearth up`, stored in the state dir, or HEARTH_ADMIN_TOKEN.",
            },
            "invokeToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "A function's invoke_token, when its spec sets one (the admin token works too).",
            },
            "metricsToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "HEARTH_METRICS_TOKEN (read-only), or the admin token.",
            },
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "detail"],
                "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
            },
            "FunctionSpec": {
                "type": "object",
                "description": "See hearth.spec.FunctionSpec (name, handler, runtime, resources, concurrency, timeout_s, min/max_instances, keep_alive, triggers, invoke_token, affinity_group).",
                "required": ["name", "handler"],
            },
            "Accepted": {
                "type": "object",
                "properties": {
                    "invocation_id": {"type": "string"},
                    "status": {"type": "string"},
                    "result": {"type": "string"},
                },
            },
        },
    },
    "paths": {
        "/v1/functions/{name}:invoke": {
            "post": {
                "summary": "Invoke a function (sync by default; ?async=true or Prefer: respond-async for 202)",
                "description": "Without a valid token an unknown function answers like a protected one (401/403), so names cannot be enumerated; 404 only with the admin token. A body must arrive within HEARTH_BODY_GRACE_S plus its length at HEARTH_BODY_MIN_RATE (408).",
                "security": [{}, {"invokeToken": []}],
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "async", "in": "query", "schema": {"type": "boolean"}},
                    {"name": "timeout", "in": "query", "schema": {"type": "number"}},
                    {
                        "name": "callback",
                        "in": "query",
                        "schema": {"type": "string", "format": "uri"},
                    },
                ],
                "requestBody": {
                    "content": {
                        "application/octet-stream": {},
                        "application/json": {},
                        "application/msgpack": {},
                    }
                },
                "responses": {
                    "200": {
                        "description": "The handler's result; headers X-Hearth-Instance, X-Hearth-Cold, X-Hearth-Invocation"
                    },
                    "202": {
                        "description": "Accepted (async)",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Accepted"}
                            }
                        },
                    },
                    **_errs(400, 401, 403, 404, 408, 413, 500, 502, 504),
                    "429": _BUSY,
                    "503": _BUSY,
                },
            }
        },
        "/v1/invocations/{id}": {
            "get": {
                "summary": "Result of an async invocation",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "status pending|running|succeeded|failed, and the result"
                    },
                    **_errs(404),
                },
            }
        },
        "/v1/functions": {
            "get": {
                "summary": "List functions",
                "security": _ADMIN,
                "responses": {
                    "200": {"description": "Functions and their instances"},
                    **_errs(401, 403),
                },
            },
            "post": {
                "summary": "Deploy (or redeploy) a function from a JSON or YAML spec",
                "security": _ADMIN,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/FunctionSpec"}
                        },
                        "application/yaml": {},
                    },
                },
                "responses": {
                    "200": {"description": "Redeployed"},
                    "201": {"description": "Deployed"},
                    **_errs(400, 401, 403),
                },
            },
        },
        "/v1/functions/{name}": {
            "get": {
                "summary": "One function",
                "security": _ADMIN,
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": {"description": "Spec and status"}, **_errs(401, 403, 404)},
            },
            "delete": {
                "summary": "Remove a function (instances drain first)",
                "security": _ADMIN,
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": {"description": "Deleted"}, **_errs(401, 403, 404)},
            },
        },
        "/v1/streams/{stream}:publish": {
            "post": {
                "summary": "Publish an event to a Redis stream",
                "security": _ADMIN,
                "parameters": [
                    {"name": "stream", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "requestBody": {
                    "content": {
                        "application/octet-stream": {},
                        "application/json": {},
                        "application/msgpack": {},
                    }
                },
                "responses": {"201": {"description": "Entry id"}, **_errs(400, 401, 403)},
            }
        },
        "/v1/status": {
            "get": {
                "summary": "Node status: data-plane mode, slot pool, instances",
                "description": "At a front gateway (`hearth up --role gateway`): every node "
                "agent's, as {role: gateway, nodes: {agent URL: its status, or {error, detail} "
                "when it did not answer}}; the token is checked by the agents.",
                "security": _ADMIN,
                "responses": {"200": {"description": "Status"}, **_errs(401, 403)},
            }
        },
        "/v1/coldstarts": {
            "get": {
                "summary": "This node's cold starts with phase timestamps (export: hearth coldstarts export)",
                "security": _ADMIN,
                "responses": {"200": {"description": "Records"}, **_errs(401, 403)},
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [{"metricsToken": []}, {"adminToken": []}],
                "responses": {
                    "200": {"description": "text exposition format"},
                    **_errs(401, 403),
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3"}}}
        },
    },
}
