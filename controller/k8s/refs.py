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
- Opt-in: the controller (and the kubelet, for the pods it creates) can read every Secret in its
  namespace, including the platform's own (admin token, Redis password, cluster secret). A
  referenced Secret or ConfigMap must carry the label `hearth.dev/function-readable: "true"`,
  which the chart never sets on its own objects; else the Function is neither served nor given
  pods (`SecretNotAllowed`/`ConfigMapNotAllowed`). The check comes before any pod is created,
  since the kubelet resolves `valueFrom` without asking the controller.

`resolve(spec, read)` is the pure part: `read(kind, name)` returns the object (`RefObject`: data
as key -> decoded value, and whether it opted in) or None when it does not exist; it raises
`RefReadError` when the API cannot say.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass

from hearth.spec import FunctionSpec, KeyRef

SECRET, CONFIG_MAP = "Secret", "ConfigMap"
#: the label a Secret/ConfigMap needs before a Function may reference it
READABLE_LABEL = "hearth.dev/function-readable"


@dataclass(frozen=True)
class RefObject:
    data: dict[str, str]
    readable: bool  # labelled READABLE_LABEL="true" by its owner


Reader = Callable[[str, str], RefObject | None]


class RefReadError(Exception):
    """The API server did not answer whether the object exists (e.g. 403, 5xx)."""


@dataclass(frozen=True)
class Unresolved:
    """Why a Function's references cannot be satisfied: a condition reason and a message that
    names the reference (never a value)."""

    reason: (
        str  # {Secret,ConfigMap}{NotFound,NotAllowed}, KeyNotFound, InvalidSecret, RefReadFailed
    )
    message: str
    transient: bool = False  # the API could not answer: keep serving what was served


def _check(kind: str, ref: KeyRef, path: str, read: Reader) -> tuple[str | None, Unresolved | None]:
    """(the value, or None when optional and absent; a problem)."""
    try:
        obj = read(kind, ref.name)
    except RefReadError as e:
        return None, Unresolved(
            "RefReadFailed", f"{path}: cannot read {kind} {ref.name!r}: {e}", True
        )
    if obj is None:
        if ref.optional:
            return None, None
        return None, Unresolved(f"{kind}NotFound", f"{path}: {kind} {ref.name!r} not found")
    if not obj.readable:  # even when optional: the kubelet would fill it in all the same
        return None, Unresolved(
            f"{kind}NotAllowed",
            f'{path}: {kind} {ref.name!r} is not labelled {READABLE_LABEL}="true"',
        )
    data = obj.data
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
        field, ref = src.source()
        kind = SECRET if field == "secretKeyRef" else CONFIG_MAP
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


def ref_object(kind: str, body: bytes) -> RefObject:
    """A Secret's or ConfigMap's data as key -> text (Secret values are base64 on the wire;
    a ConfigMap's binaryData keys count as present) and its opt-in label."""
    obj = json.loads(body)
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if kind == SECRET:
        data = {
            k: base64.b64decode(v).decode("utf-8", "replace")
            for k, v in (obj.get("data") or {}).items()
        }
    else:
        data = {**{k: "" for k in obj.get("binaryData") or {}}, **(obj.get("data") or {})}
    return RefObject(data, labels.get(READABLE_LABEL) == "true")
