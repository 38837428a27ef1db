"""A small synchronous HTTP client for the gateway, used by the CLI (stdlib only, so it is quick
to start) and handy in scripts."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from hearth.config import DEFAULT_PORT, read_admin_token


class ClientError(Exception):
    """A request failed; `str()` is one clear line (status, error code, detail)."""

    def __init__(self, message: str, status: int = 0, body: Any = None):
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 120.0):
        import os

        self.url = (
            url
            or os.environ.get("HEARTH_URL")
            or f"http://127.0.0.1:{os.environ.get('HEARTH_PORT', DEFAULT_PORT)}"
        ).rstrip("/")
        self.token = token or read_admin_token()
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str | None = None,
        admin: bool = False,
        token: str | None = None,
        ok: tuple[int, ...] = (200, 201, 202),
    ) -> Reply:
        headers = {"Accept": "application/json, */*"}
        if content_type:
            headers["Content-Type"] = content_type
        tok = token or (self.token if admin else None)
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                rep = Reply(resp.status, dict(resp.headers.items()), resp.read())
        except urllib.error.HTTPError as e:
            rep = Reply(e.code, dict(e.headers.items()), e.read())
        except urllib.error.URLError as e:
            raise ClientError(
                f"cannot reach the gateway at {self.url}: {e.reason} (is `hearth up` running? "
                "on another port: HEARTH_PORT=N, or HEARTH_URL=http://host:N)"
            ) from None
        except (http.client.HTTPException, ConnectionError) as e:
            raise ClientError(
                f"the gateway at {self.url} dropped the connection: {type(e).__name__}: {e}"
            ) from None
        except TimeoutError:
            raise ClientError(
                f"the gateway at {self.url} did not answer within {self.timeout:g}s"
            ) from None
        if rep.status not in ok:
            try:
                err = rep.json()
                msg = f"{rep.status} {err.get('error')}: {err.get('detail')}"
            except ValueError:
                msg = f"{rep.status}: {rep.body[:200]!r}"
            if rep.status == 401 and admin and not tok:
                msg += " (no admin token: set HEARTH_ADMIN_TOKEN or run on the machine where `hearth up` runs)"
            raise ClientError(msg, rep.status, rep.body)
        return rep

    # conveniences
    def deploy(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.request(
            "POST",
            "/v1/functions",
            json.dumps(spec).encode(),
            content_type="application/json",
            admin=True,
        ).json()

    def functions(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/functions", admin=True).json()["functions"]

    def delete(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/functions/{name}", admin=True).json()

    def invoke(
        self,
        name: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        is_async: bool = False,
        token: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        q = []
        if is_async:
            q.append("async=true")
        if timeout:
            q.append(f"timeout={timeout:g}")
        path = f"/v1/functions/{name}:invoke" + ("?" + "&".join(q) if q else "")
        return self.request(
            "POST", path, data, content_type=content_type, token=token, ok=(200, 202)
        )

    def invocation(self, inv: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/invocations/{inv}").json()

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status", admin=True).json()
