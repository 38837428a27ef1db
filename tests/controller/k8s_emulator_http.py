"""The Kubernetes API emulator's wire: the REST and watch endpoints over HTTP/1.1 (JSON bodies,
chunked watch streams, Status objects for errors), with label and field selectors. The state
and the emulated scheduler/kubelet live in k8s_emulator.py; this module only speaks the protocol."""

from __future__ import annotations

import copy
import json
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlparse

from k8s_admission import (
    Invalid,
    admit_config_map,
    admit_secret,
    json_patch,
    merge_patch,
    strategic_merge_patch,
    validate_metadata,
    validate_pod,
    validate_pod_update,
)

if TYPE_CHECKING:
    from k8s_emulator import Emulator

GROUP, VERSION, PLURAL = "hearth.dev", "v1alpha1", "functions"
_BUILTIN = ("pods", "secrets", "configmaps")  # kinds that take a strategic merge patch


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _match_fields(obj: dict, selector: str | None) -> bool:
    """Field selectors (`a.b=v`, `a.b==v`, `a.b!=v`, comma = and) over dotted paths."""
    for part in (selector or "").split(","):
        if not part.strip():
            continue
        neg = "!=" in part
        k, v = part.split("!=" if neg else "=", 1)
        v = v.lstrip("=").strip()
        cur: object = obj
        for seg in k.strip().split("."):
            cur = cur.get(seg) if isinstance(cur, dict) else None
        if (str(cur or "") == v) == neg:
            return False
    return True


def _match_labels(obj: dict, selector: str | None) -> bool:
    if not selector:
        return True
    labels = obj.get("metadata", {}).get("labels") or {}
    for part in selector.split(","):
        if "!=" in part:
            k, v = part.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in part:
            k, v = part.split("=", 1)
            if labels.get(k.strip().rstrip("=")) != v.strip():
                return False
        elif part.strip() and part.strip() not in labels:
            return False
    return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    emu: Emulator

    def log_message(self, *a) -> None:  # quiet
        pass

    # --- plumbing ------------------------------------------------------------------------------
    _warnings: list[str] = []

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        for w in self._warnings:  # as the API server reports pruned fields
            self.send_header("Warning", f'299 - "{w}"')
        self._warnings = []
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str, causes: list[str] = ()) -> None:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        if causes:
            body["details"] = {
                "causes": [
                    {"reason": "FieldValueInvalid", "field": c.split(":")[0], "message": c}
                    for c in causes
                ]
            }
        self._send(code, body)

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"null")

    def _route(self):
        u = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        parts = [p for p in u.path.split("/") if p]
        if parts[:2] == ["api", "v1"] and parts[2:] == ["nodes"]:
            return "nodes", None, None, None, q
        if parts[:2] == ["api", "v1"] and parts[2:] == ["pods"]:
            return "pods", "*", None, None, q  # every namespace (list only)
        if (
            parts[:2] == ["api", "v1"]
            and len(parts) in (5, 6)
            and parts[2] == "namespaces"
            and parts[4] in ("events", "secrets", "configmaps")
        ):
            return parts[4], parts[3], (parts[5] if len(parts) > 5 else None), None, q
        if (
            parts[:2] == ["api", "v1"]
            and len(parts) >= 5
            and parts[2] == "namespaces"
            and parts[4] == "pods"
        ):
            return (
                "pods",
                parts[3],
                (parts[5] if len(parts) > 5 else None),
                (parts[6] if len(parts) > 6 else None),
                q,
            )
        if (
            parts[:3] == ["apis", GROUP, VERSION]
            and len(parts) >= 6
            and parts[3] == "namespaces"
            and parts[5] == PLURAL
        ):
            return (
                PLURAL,
                parts[4],
                (parts[6] if len(parts) > 6 else None),
                (parts[7] if len(parts) > 7 else None),
                q,
            )
        return None, None, None, None, q

    def _handle(self, method: str) -> None:
        kind, ns, name, sub, q = self._route()
        s = self.emu.store
        s.requests.append((method, self.path))
        if kind is None:
            return self._status(
                404, "NotFound", f"the server could not find the requested resource: {self.path}"
            )
        if kind == "nodes":
            with s.cond:
                return self._send(
                    200,
                    {
                        "kind": "NodeList",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(s.rv)},
                        "items": s.nodes,
                    },
                )
        if method == "GET" and name is None:
            if q.get("watch") in ("true", "True", "1"):
                return self._watch(kind, ns, q)
            with s.cond:
                items = [
                    copy.deepcopy(o)
                    for (k, n, _), o in sorted(s.objs.items())
                    if k == kind
                    and ns in (n, "*")
                    and _match_labels(o, q.get("labelSelector"))
                    and _match_fields(o, q.get("fieldSelector"))
                ]
                return self._send(
                    200,
                    {
                        "kind": "List",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(s.rv)},
                        "items": items,
                    },
                )
        if ns == "*":
            return self._status(405, "MethodNotAllowed", f"{method} on all namespaces")
        try:
            with s.cond:
                return self._write(method, kind, ns, name, sub, q)
        except Invalid as e:
            return self._status(e.code, e.reason, f"{kind} {name or ''} is invalid: {e}", e.causes)

    def _admit(self, kind: str, obj: dict, old: dict | None, q: dict) -> dict:
        """The object as the API server would store it; raises Invalid."""
        if kind == "pods":
            errs = validate_pod(obj) if old is None else validate_pod_update(old, obj)
            if errs:
                raise Invalid(errs)
            return obj
        if kind == "secrets":
            return admit_secret(obj)
        if kind == "configmaps":
            return admit_config_map(obj)
        if kind == "events":
            errs = validate_metadata(obj.get("metadata") or {})
            if not (obj.get("involvedObject") or {}).get("name"):
                errs.append("involvedObject.name: Required value")
            if obj.get("type") not in ("Normal", "Warning"):
                errs.append(f"type: Unsupported value: {obj.get('type')!r}")
            if errs:
                raise Invalid(errs)
            return obj
        stored, warnings = self.emu.admission.admit(
            obj, strict=q.get("fieldValidation") == "Strict"
        )
        self._warnings = warnings
        return stored

    def _write(self, method: str, kind: str, ns: str, name: str | None, sub: str | None, q: dict):
        s = self.emu.store
        if method == "POST" and name is None:
            obj = self._body()
            if not isinstance(obj, dict):
                raise Invalid(["body: must be an object"], 400, "BadRequest")
            meta = obj.setdefault("metadata", {})
            if kind == "pods" and self.emu.reject_pod_creates:
                raise Invalid([self.emu.reject_pod_creates], 403, "Forbidden")
            obj = self._admit(kind, obj, None, q)
            meta = obj["metadata"]
            key = (kind, ns, meta["name"])
            if key in s.objs:
                return self._status(409, "AlreadyExists", f'{kind} "{meta["name"]}" already exists')
            meta.update(
                namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now_iso(), generation=1
            )
            if kind == "pods":
                self.emu._schedule(obj)
            elif kind == PLURAL:
                obj.pop("status", None)
            s.bump(obj)
            s.objs[key] = obj
            s._emit(kind, "ADDED", obj)
            return self._send(201, obj)
        key = (kind, ns, name)
        obj = s.objs.get(key)
        if obj is None:
            return self._status(404, "NotFound", f'{kind} "{name}" not found')
        if method == "GET":
            return self._send(200, obj)
        if method == "DELETE":
            gone = self.emu._delete(kind, ns, name)
            return self._send(200, gone)
        if method not in ("PUT", "PATCH"):
            return self._status(405, "MethodNotAllowed", method)
        body = self._body()
        if method == "PUT":
            new = copy.deepcopy(body)
        else:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if ctype == "application/merge-patch+json":
                new = merge_patch(obj, body)
            elif ctype == "application/json-patch+json":
                new = json_patch(obj, body)
            elif ctype == "application/strategic-merge-patch+json" and kind in _BUILTIN:
                new = strategic_merge_patch(obj, body)
            else:
                return self._status(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format - accepted media types include: "
                    f"application/json-patch+json, application/merge-patch+json"
                    f"{', application/strategic-merge-patch+json' if kind in _BUILTIN else ''}",
                )
        if not isinstance(new, dict):
            raise Invalid(["body: must be an object"], 400, "BadRequest")
        if sub == "status":
            updated = copy.deepcopy(obj)
            updated["status"] = new.get("status", {})
        else:
            updated = new
            updated["metadata"] = {
                **obj["metadata"],
                **{
                    k: v
                    for k, v in (new.get("metadata") or {}).items()
                    if k in ("labels", "annotations", "finalizers", "ownerReferences")
                },
            }
            for k in ("labels", "annotations"):  # a patch that removed the map removes it
                if k not in (new.get("metadata") or {}):
                    updated["metadata"].pop(k, None)
            updated["status"] = obj.get("status", {})  # only the status subresource writes it
        rv_sent = (
            (body.get("metadata") or {}).get("resourceVersion")
            if isinstance(body, dict) and method == "PUT"
            else None
        )
        if rv_sent and rv_sent != obj["metadata"]["resourceVersion"]:
            return self._status(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version and try again",
            )
        updated = self._admit(kind, updated, obj, q)
        if kind == PLURAL and updated.get("spec") != obj.get("spec"):
            updated["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
        s.bump(updated)
        s.objs[key] = updated
        s._emit(kind, "MODIFIED", updated)
        return self._send(200, updated)

    def _chunk(self, obj: dict) -> None:
        data = (json.dumps(obj) + "\n").encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, kind: str, ns: str, q: dict) -> None:
        s = self.emu.store
        timeout = float(q.get("timeoutSeconds") or 3600)
        deadline = time.monotonic() + timeout
        sel = q.get("labelSelector")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with s.cond:
            gen = s.drop_gen
            if self.emu.inject_watch_errors > 0:
                self.emu.inject_watch_errors -= 1
                self.close_connection = True
                self.wfile.write(b'5\r\n{"ty')  # half a chunk, then the connection dies
                self.wfile.flush()
                return
            rv_q = q.get("resourceVersion")
            if rv_q not in (None, "", "0"):
                since = int(rv_q)
                if since < s.compacted:
                    self._chunk(
                        {
                            "type": "ERROR",
                            "object": {
                                "kind": "Status",
                                "apiVersion": "v1",
                                "metadata": {},
                                "status": "Failure",
                                "message": f"too old resource version: {since} ({s.compacted})",
                                "reason": "Expired",
                                "code": 410,
                            },
                        }
                    )
                    self.wfile.write(b"0\r\n\r\n")
                    return
                pending = [(rv, t, o) for rv, k, t, o in s.events if k == kind and rv > since]
            else:
                pending = [
                    (int(o["metadata"]["resourceVersion"]), "ADDED", copy.deepcopy(o))
                    for (k, n, _), o in sorted(s.objs.items())
                    if k == kind and n == ns
                ]
                since = s.rv
            last = max([since] + [p[0] for p in pending])
        try:
            while True:
                for _rv, t, o in pending:
                    if o["metadata"].get("namespace") == ns and _match_labels(o, sel):
                        self._chunk({"type": t, "object": o})
                with s.cond:
                    while True:
                        if s.drop_gen != gen:
                            self.close_connection = True
                            self.wfile.write(b'40\r\n{"type": "MODIF')  # cut mid-chunk
                            self.wfile.flush()
                            return
                        pending = [
                            (rv, t, o) for rv, k, t, o in s.events if k == kind and rv > last
                        ]
                        if pending:
                            last = pending[-1][0]
                            break
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self.wfile.write(b"0\r\n\r\n")
                            return
                        s.cond.wait(min(left, 0.5))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_DELETE(self):
        self._handle("DELETE")
