"""A small, honest Kubernetes API emulator for the controller tests.

Why not kmock alone: kmock's emulator keeps no resourceVersions (lists return '...'), cannot
answer a watch from a stale resourceVersion with 410 Gone, has no label selectors and no
status subresource -- exactly the behaviours the Kubernetes backend must survive. This server
speaks the real REST + watch wire protocol to the official `kubernetes` client over loopback
HTTP/1.1 (JSON bodies, chunked watch streams of {"type", "object"} lines, Status objects for
errors) for the handful of endpoints Hearth uses:

  GET  /api/v1/nodes
  GET|POST /api/v1/namespaces/{ns}/pods            (list, ?watch, ?labelSelector=k=v,...)
  GET|DELETE|PATCH /api/v1/namespaces/{ns}/pods/{name}
  GET|POST /apis/hearth.dev/v1alpha1/namespaces/{ns}/functions   (list, ?watch)
  GET|PUT|PATCH|DELETE  .../functions/{name}        (spec changes bump metadata.generation)
  GET|PUT|PATCH         .../functions/{name}/status (status subresource: only .status changes)

Emulated, not real: there is no scheduler or kubelet -- a created pod is "scheduled" at once
onto the node its required node affinity (kubernetes.io/hostname) or nodeName names, and marked
Running/Ready with PodScheduled/ContainersReady timestamps; ownerReference garbage collection
deletes pods when their Function is deleted; no admission, no CRD schema validation (the CRD's
own tests cover the schema), deletion is immediate (no grace period).
Test hooks: `compact()` forgets the event history (watches resuming from older versions get a
410 ERROR event), `drop_watches()` cuts every open watch stream mid-chunk, `inject_watch_errors`.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

GROUP, VERSION, PLURAL = "hearth.dev", "v1alpha1", "functions"


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class Store:
    def __init__(self) -> None:
        self.objs: dict[tuple[str, str, str], dict] = {}  # (kind, ns, name) -> object
        self.events: list[tuple[int, str, str, dict]] = []  # (rv, kind, type, object)
        self.rv = 100
        self.compacted = 0
        self.cond = threading.Condition()
        self.drop_gen = 0
        self.requests: list[tuple[str, str]] = []
        self.nodes: list[dict] = []

    def _emit(self, kind: str, etype: str, obj: dict) -> None:
        self.events.append(
            (int(obj["metadata"]["resourceVersion"]), kind, etype, copy.deepcopy(obj))
        )
        self.cond.notify_all()

    def bump(self, obj: dict) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)


class Emulator:
    def __init__(
        self,
        nodes: list[tuple[str, str, str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.store = Store()
        for name, cpu, mem in nodes or [
            ("node-a", "4", "8Gi"),
            ("node-b", "4", "8Gi"),
            ("node-c", "4", "8Gi"),
        ]:
            self.store.nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": {"kubernetes.io/hostname": name},
                        "resourceVersion": "1",
                        "uid": str(uuid.uuid4()),
                    },
                    "status": {
                        "allocatable": {"cpu": cpu, "memory": mem, "pods": "110"},
                        "capacity": {"cpu": cpu, "memory": mem},
                    },
                }
            )
        self.inject_watch_errors = 0
        handler = type("H", (_Handler,), {"emu": self})
        # host/port: the multi-node tests run it in a container on their private network
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host = self.server.server_address[0]
        return (
            f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.server.server_address[1]}"
        )

    def start(self) -> Emulator:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.drop_watches()
        self.server.shutdown()
        self.server.server_close()

    # --- test hooks ----------------------------------------------------------------------------
    def compact(self) -> None:
        with self.store.cond:
            self.store.compacted = self.store.rv
            self.store.events.clear()

    def drop_watches(self) -> None:
        with self.store.cond:
            self.store.drop_gen += 1
            self.store.cond.notify_all()

    def objects(self, kind: str, ns: str = "default") -> dict[str, dict]:
        with self.store.cond:
            return {
                name: copy.deepcopy(o)
                for (k, n, name), o in self.store.objs.items()
                if k == kind and n == ns
            }

    def delete(self, kind: str, ns: str, name: str) -> None:
        """Delete an object as another client (e.g. kubectl) would."""
        with self.store.cond:
            self._delete(kind, ns, name)

    def _delete(self, kind: str, ns: str, name: str) -> dict | None:
        s = self.store
        obj = s.objs.pop((kind, ns, name), None)
        if obj is None:
            return None
        s.bump(obj)
        s._emit(kind, "DELETED", obj)
        if kind == "functions":  # garbage collection of owned pods
            uid = obj["metadata"]["uid"]
            for key, o in list(s.objs.items()):
                if key[0] == "pods" and any(
                    r.get("uid") == uid for r in o["metadata"].get("ownerReferences", [])
                ):
                    self._delete(*key)
        return obj

    def _schedule(self, pod: dict) -> None:
        """Stand-in for the scheduler and kubelet (see module docstring)."""
        spec = pod.setdefault("spec", {})
        node = spec.get("nodeName")
        if not node:
            try:
                terms = spec["affinity"]["nodeAffinity"][
                    "requiredDuringSchedulingIgnoredDuringExecution"
                ]["nodeSelectorTerms"]
                for t in terms:
                    for e in t.get("matchExpressions", []):
                        if e["key"] == "kubernetes.io/hostname" and e["operator"] == "In":
                            node = e["values"][0]
            except (KeyError, TypeError, IndexError):
                node = None
        if node is None or node not in {n["metadata"]["name"] for n in self.store.nodes}:
            pod["status"] = {
                "phase": "Pending",
                "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
                ],
            }
            return
        spec["nodeName"] = node
        t = _now_iso()
        pod["status"] = {
            "phase": "Running",
            "startTime": t,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": t},
                {"type": "Ready", "status": "True", "lastTransitionTime": t},
            ],
            "containerStatuses": [
                {
                    "name": c.get("name", "c"),
                    "ready": True,
                    "restartCount": 0,
                    "image": c.get("image", ""),
                    "imageID": "",
                    "state": {"running": {"startedAt": t}},
                }
                for c in spec.get("containers", [])
            ],
        }


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
    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(
            code,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": reason,
                "code": code,
            },
        )

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"null")

    def _route(self):
        u = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        parts = [p for p in u.path.split("/") if p]
        if parts[:2] == ["api", "v1"] and parts[2:] == ["nodes"]:
            return "nodes", None, None, None, q
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
                    if k == kind and n == ns and _match_labels(o, q.get("labelSelector"))
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
        with s.cond:
            if method == "POST" and name is None:
                obj = self._body()
                meta = obj.setdefault("metadata", {})
                if not meta.get("name"):
                    return self._status(422, "Invalid", "metadata.name: Required value")
                key = (kind, ns, meta["name"])
                if key in s.objs:
                    return self._status(
                        409, "AlreadyExists", f'{kind} "{meta["name"]}" already exists'
                    )
                meta.update(
                    namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now_iso(), generation=1
                )
                if kind == "pods":
                    self.emu._schedule(obj)
                else:
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
            if method in ("PUT", "PATCH"):
                body = self._body()
                new = merge_patch(obj, body) if method == "PATCH" else copy.deepcopy(body)
                if sub == "status":
                    updated = copy.deepcopy(obj)
                    updated["status"] = new.get("status", {})
                else:
                    updated = new
                    updated["metadata"] = {
                        **obj["metadata"],
                        **{
                            k: v
                            for k, v in new.get("metadata", {}).items()
                            if k in ("labels", "annotations", "finalizers", "ownerReferences")
                        },
                    }
                    if kind == PLURAL:
                        updated["status"] = obj.get("status", {})
                        if updated.get("spec") != obj.get("spec"):
                            updated["metadata"]["generation"] = (
                                obj["metadata"].get("generation", 1) + 1
                            )
                rv_sent = (
                    (body.get("metadata") or {}).get("resourceVersion") if method == "PUT" else None
                )
                if rv_sent and rv_sent != obj["metadata"]["resourceVersion"]:
                    return self._status(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    )
                s.bump(updated)
                s.objs[key] = updated
                s._emit(kind, "MODIFIED", updated)
                return self._send(200, updated)
        return self._status(405, "MethodNotAllowed", method)

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
