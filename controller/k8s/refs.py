"""A Function's references to Secret and ConfigMap keys: checked and resolved by the controller.

- `invokeTokenSecretRef`: the node agents check invocations against the token, so the
  controller reads the Secret and writes the value into the spec it syncs to the registry
  (`hearth:functions` in the platform's private Redis, which function code has no credentials
  for). The agents never hand it to an instance (`FunctionSpec.for_instance`), the admin API
  shows it as `***`, and no status, Event or log line carries it.
- `envValueFrom`: the values never pass through the controller, the registry or the agent: the
  instance pods get `env[].valueFrom` and the kubelet fills them in at container creation. The
  controller only checks that each non-optional object and key exists, so a Function whose pods
  could not start (CreateContainerConfigError) says why instead.

`resolve(spec, read)` is the pure part: `read(kind, name)` returns the object's data (key ->
decoded value) or None when it does not exist; it raises `RefReadError` when the API cannot say.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass

from hearth.spec import FunctionSpec, KeyRef

SECRET, CONFIG_MAP = "Secret", "ConfigMap"

Reader = Callable[[str, str], dict[str, str] | None]


class RefReadError(Exception):
    """The API server did not answer whether the object exists (e.g. 403, 5xx)."""


@dataclass(frozen=True)
class Unresolved:
    """Why a Function's references cannot be satisfied: a condition reason and a message that
    names the reference (never a value)."""

    reason: str  # SecretNotFound, ConfigMapNotFound, KeyNotFound, InvalidSecret, RefReadFailed
    message: str
    transient: bool = False  # the API could not answer: keep serving what was served


def _check(kind: str, ref: KeyRef, path: str, read: Reader) -> tuple[str | None, Unresolved | None]:
    """(the value, or None when optional and absent; a problem)."""
    try:
        data = read(kind, ref.name)
    except RefReadError as e:
        return None, Unresolved(
            "RefReadFailed", f"{path}: cannot read {kind} {ref.name!r}: {e}", True
        )
    if data is None:
        if ref.optional:
            return None, None
        return None, Unresolved(f"{kind}NotFound", f"{path}: {kind} {ref.name!r} not found")
    if ref.key not in data:
        if ref.optional:
            return None, None
        return None, Unresolved(
            "KeyNotFound", f"{path}: {kind} {ref.name!r} has no key {ref.key!r}"
        )
    return data[ref.key], None


def resolve(spec: FunctionSpec, read: Reader) -> tuple[FunctionSpec | None, Unresolved | None]:
    """The spec to serve (invoke token filled in from its Secret; env references kept for the
    pods), or None and why. The first problem is reported."""
    for name, src in sorted(spec.env_value_from.items()):
        kind, ref, field = (
            (SECRET, src.secret_key_ref, "secretKeyRef")
            if src.secret_key_ref is not None
            else (CONFIG_MAP, src.config_map_key_ref, "configMapKeyRef")
        )
        assert ref is not None
        _, problem = _check(kind, ref, f"spec.envValueFrom.{name}.{field}", read)
        if problem is not None:
            return None, problem
    ref = spec.invoke_token_secret_ref
    if ref is None:
        return spec, None
    path = "spec.invokeTokenSecretRef"
    token, problem = _check(SECRET, ref, path, read)
    if problem is not None:
        return None, problem
    if token is None:  # optional and absent: no token would open the function to anyone
        return None, Unresolved(
            "SecretNotFound", f"{path}: Secret {ref.name!r} key {ref.key!r} not found"
        )
    token = token.rstrip("\r\n")  # `kubectl create secret --from-file` keeps a final newline
    if len(token) < 8:
        return None, Unresolved(
            "InvalidSecret",
            f"{path}: the token in Secret {ref.name!r} key {ref.key!r} is shorter than 8 characters",
        )
    served = spec.model_copy(update={"invoke_token": token, "invoke_token_secret_ref": None})
    return served, None


def object_data(kind: str, body: bytes) -> dict[str, str]:
    """A Secret's or ConfigMap's data as key -> text (Secret values are base64 on the wire;
    a ConfigMap's binaryData keys count as present)."""
    obj = json.loads(body)
    if kind == SECRET:
        return {
            k: base64.b64decode(v).decode("utf-8", "replace")
            for k, v in (obj.get("data") or {}).items()
        }
    return {**{k: "" for k in obj.get("binaryData") or {}}, **(obj.get("data") or {})}
