"""The function spec: what a user deploys. One validated model shared by the CLI, the gateway's
admin API, the controller (local and Kubernetes backends) and the Helm chart's Function resource."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_RE = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"
ENTRY_RE = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
MODULE_RE = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"  # an importable module name: a.b.c
MAX_PRELOAD = 32
KEEPALIVE_POLICIES = ("fixed", "histogram", "greedy-dual", "coldstart-aware")
INTERNAL_STREAM_PREFIX = "hearth:"  # the same namespace hearth.queue.wire reserves for publishers
# Kubernetes label syntax: the key is an optional DNS-subdomain prefix (<= 253) and '/', then a
# name (<= 63); the value is empty or a name (<= 63). Labels land on instance pods verbatim.
LABEL_NAME_RE = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY_RE = (
    rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{LABEL_NAME_RE}$"
)
LABEL_VALUE_RE = rf"^({LABEL_NAME_RE})?$"
LABEL_KEY_MAX = 253 + 1 + 63
# Keys the platform sets itself (its pod selector) or that Kubernetes reserves for its own
# components: a user label with one of them could hide pods from the controller.
RESERVED_LABEL_RE = r"^(([^/]*\.)?(hearth\.dev|kubernetes\.io|k8s\.io)/)"
RESERVED_LABEL_ALLOWED_PREFIX = "app.kubernetes.io/"  # recommended labels stay the user's...
RESERVED_LABEL_KEYS = ("app.kubernetes.io/managed-by",)  # ...except the one the selector uses


def label_key_problem(key: str) -> str | None:
    """Why `key` cannot be a user label on an instance pod (None if it can)."""
    prefix = key.rpartition("/")[0]
    if len(key) > LABEL_KEY_MAX or len(prefix) > 253 or not re.match(LABEL_KEY_RE, key):
        return f"invalid label key {key!r} (optional DNS-subdomain prefix and '/', then <= 63 of [A-Za-z0-9-_.])"
    if key in RESERVED_LABEL_KEYS or (
        re.match(RESERVED_LABEL_RE, key) and not key.startswith(RESERVED_LABEL_ALLOWED_PREFIX)
    ):
        return f"label key {key!r} is reserved for the platform or Kubernetes"
    return None


class SpecError(ValueError):
    """A spec was rejected; the message names each bad field and why."""


class _Strict(BaseModel):
    # a NaN or an infinity in any number is refused as "should be a finite number": a NaN
    # timeout was refused as "should be less than or equal to 86400", and an infinite or NaN
    # keep-alive was taken (NaN compares false: never idle long enough, never scaled in)
    model_config = ConfigDict(
        extra="forbid", frozen=False, populate_by_name=True, allow_inf_nan=False
    )


class Resources(_Strict):
    memory_mb: int = Field(
        256, gt=0, le=1_048_576, description="Memory request per instance (MiB)."
    )
    cpu_millicores: int = Field(500, gt=0, le=1_000_000, description="CPU request per instance.")


# Kubernetes object names (Secret, ConfigMap: DNS-1123 subdomain) and their data keys.
OBJECT_NAME_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DATA_KEY_RE = r"^[-._a-zA-Z0-9]+$"
#: env names an instance pod sets itself (a reference may not replace them)
RESERVED_ENV_PREFIX = "HEARTH_"


def env_name_problem(k: str) -> str | None:
    if not k or not (k[0].isalpha() or k[0] == "_") or not all(c.isalnum() or c == "_" for c in k):
        return f"invalid environment variable name {k!r}"
    return None


class KeyRef(_Strict):
    """A key of a Secret or ConfigMap in the Function's namespace."""

    # Kubernetes only: the controller resolves it; a missing object or key is reported in the
    # Function's status (Ready=False with a reason), never a crash.

    name: str = Field(..., max_length=253, pattern=OBJECT_NAME_RE, description="Object name.")
    key: str = Field(..., max_length=253, pattern=DATA_KEY_RE, description="Key in its data.")
    optional: bool = Field(False, description="Missing object or key: leave the variable unset.")


class EnvSource(_Strict):
    """Where the variable's value comes from: exactly one source, as in a container's valueFrom."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.secretKeyRef) != has(self.configMapKeyRef)",
                    "message": "exactly one of secretKeyRef and configMapKeyRef",
                }
            ]
        }
    )
    secret_key_ref: KeyRef | None = None
    config_map_key_ref: KeyRef | None = None

    @model_validator(mode="after")
    def _one(self) -> EnvSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("exactly one of secret_key_ref and config_map_key_ref")
        return self

    def source(self) -> tuple[Literal["secretKeyRef", "configMapKeyRef"], KeyRef]:
        """The one source set, with its field name as in a container's `valueFrom`."""
        if self.secret_key_ref is not None:
            return "secretKeyRef", self.secret_key_ref
        assert self.config_map_key_ref is not None  # _one
        return "configMapKeyRef", self.config_map_key_ref


class KeepAlive(_Strict):
    policy: Literal["fixed", "histogram", "greedy-dual", "coldstart-aware"] = Field(
        "fixed", description="Keep-alive policy deciding when idle instances stop."
    )
    ttl_s: float = Field(
        60.0, ge=0, description="Idle time before scale-in (fixed policy; cap for others)."
    )


class HttpTrigger(_Strict):
    type: Literal["http"] = "http"


class StreamTrigger(_Strict):
    type: Literal["redis-stream"] = "redis-stream"
    stream: str = Field(
        ..., min_length=1, max_length=256, description="Redis stream key to consume."
    )
    group: str | None = Field(None, description="Consumer group (default: hearth-<function>).")
    batch_size: int = Field(16, ge=1, le=10_000)
    max_inflight: int = Field(64, ge=1, le=100_000)
    max_deliveries: int = Field(5, ge=1, le=1000)
    invoke_batch: int = Field(
        32,
        ge=1,
        le=1024,
        description=(
            "Most events carried to one instance in one round trip under a backlog (fast "
            "handlers only; each event still gets its own call and outcome). 1 disables."
        ),
    )
    # at most a day: the durations become Redis arguments in ms (an infinite claim_idle_s broke
    # the reclaim of a dead consumer's entries) and a retry later than that is a lost event
    backoff_s: float = Field(
        0.5, ge=0, le=86_400, description="First retry delay; doubles per delivery."
    )
    backoff_max_s: float = Field(30.0, ge=0, le=86_400)
    claim_idle_s: float = Field(
        30.0, gt=0, le=86_400, description="Reclaim entries idle this long (dead consumer)."
    )


Trigger = Annotated[HttpTrigger | StreamTrigger, Field(discriminator="type")]


class FunctionSpec(_Strict):
    """A deployable function. Field names are the wire/YAML names (snake_case)."""

    name: str = Field(..., pattern=NAME_RE, description="DNS-1123 label: lowercase, digits, '-'.")
    handler: str = Field(..., pattern=ENTRY_RE, description="Entry point 'module:callable'.")
    init: str | None = Field(
        None, pattern=ENTRY_RE, description="Optional 'module:callable' run once at cold start."
    )
    runtime: Literal["python3.11", "python3"] = "python3.11"
    code_path: str | None = Field(
        None, description="Directory prepended to sys.path (local backend)."
    )
    image: str | None = Field(None, description="Container image (Kubernetes backend).")
    env: dict[str, str] = Field(default_factory=dict)
    env_value_from: dict[str, EnvSource] = Field(
        default_factory=dict,
        max_length=64,
        description="Environment variables from Secret/ConfigMap keys (Kubernetes: set on the "
        "instance pods; such a function never uses a generic warm-pool pod).",
    )
    # the pattern is checked by the validator below (with a message naming the entry) and
    # published in the JSON schema (the CRD's admission checks it too)
    preload: list[
        Annotated[str, Field(max_length=200, json_schema_extra={"pattern": MODULE_RE})]
    ] = Field(
        default_factory=list,
        max_length=MAX_PRELOAD,
        description=(
            "Modules imported once per node by the zygote this function's instances fork from "
            "(e.g. numpy): an instance finds them imported instead of importing them itself."
        ),
    )
    resources: Resources = Field(default_factory=Resources)
    concurrency: int = Field(
        1, ge=1, le=1000, description="Invocations one instance serves at once."
    )
    queue_size: int = Field(
        100, ge=0, le=1_000_000, description="Invocations waiting for an instance before 429."
    )
    timeout_s: float = Field(30.0, gt=0, le=86_400)
    min_instances: int = Field(0, ge=0, le=10_000)
    max_instances: int = Field(10, ge=1, le=10_000)
    keep_alive: KeepAlive = Field(default_factory=KeepAlive)
    triggers: list[Trigger] = Field(default_factory=lambda: [HttpTrigger()])
    invoke_token: str | None = Field(
        None, min_length=8, description="If set, callers must send it as a bearer token."
    )
    invoke_token_secret_ref: KeyRef | None = Field(
        None,
        description="The invoke token from a Secret key (Kubernetes: the controller reads it; "
        "instead of invoke_token).",
    )
    affinity_group: str | None = Field(
        None, pattern=NAME_RE, description="Co-locate with this group."
    )
    spread: bool = Field(False, description="Spread replicas over nodes instead of packing.")
    labels: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_RE)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Labels for the instances (Kubernetes label syntax; platform keys reserved).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> FunctionSpec:
        if self.min_instances > self.max_instances:
            raise ValueError(
                f"min_instances ({self.min_instances}) exceeds max_instances ({self.max_instances})"
            )
        if self.invoke_token is not None and self.invoke_token_secret_ref is not None:
            raise ValueError("invoke_token and invoke_token_secret_ref: give one, not both")
        both = sorted(set(self.env) & set(self.env_value_from))
        if both:
            raise ValueError(f"env and env_value_from both set {', '.join(both)}")
        return self

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if problem := env_name_problem(k):
                raise ValueError(problem)
        return v

    @field_validator("env_value_from")
    @classmethod
    def _ref_env_names(cls, v: dict[str, EnvSource]) -> dict[str, EnvSource]:
        for k in v:
            if problem := env_name_problem(k):
                raise ValueError(problem)
            if k.startswith(RESERVED_ENV_PREFIX):
                raise ValueError(f"{k!r}: names starting with {RESERVED_ENV_PREFIX} are reserved")
        return v

    def refs(self) -> bool:
        """Whether values come from Kubernetes Secrets/ConfigMaps (only the controller can
        resolve them)."""
        return bool(self.env_value_from) or self.invoke_token_secret_ref is not None

    def for_instance(self) -> dict[str, Any]:
        """The spec an instance is given (boot record, specialisation): without the invoke
        token, which only the agent checks (function code never needs it)."""
        return self.model_dump(mode="json", exclude={"invoke_token"})

    @field_validator("preload")
    @classmethod
    def _preload_modules(cls, v: list[str]) -> list[str]:
        seen = set()
        for m in v:
            if not re.fullmatch(MODULE_RE, m):
                raise ValueError(
                    f"{m!r} is not a module name (dotted Python identifiers, e.g. numpy or "
                    "scipy.linalg)"
                )
            if m in seen:
                raise ValueError(f"module {m!r} is listed twice")
            seen.add(m)
        return v

    @field_validator("triggers")
    @classmethod
    def _user_streams(cls, v: list[Any]) -> list[Any]:
        # hearth:* holds the registry, async invocations and their results: a user trigger on it
        # would hand platform records (and other callers' payloads) to function code
        for t in v:
            if isinstance(t, StreamTrigger) and t.stream.startswith(INTERNAL_STREAM_PREFIX):
                raise ValueError(
                    f"stream {t.stream!r}: the prefix {INTERNAL_STREAM_PREFIX!r} is reserved for the platform"
                )
        return v

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            problem = label_key_problem(k)
            if problem:
                raise ValueError(problem)
        return v

    def stream_triggers(self) -> list[StreamTrigger]:
        return [t for t in self.triggers if isinstance(t, StreamTrigger)]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def format_validation_error(err: ValidationError, source: str = "spec") -> str:
    """One line per problem: 'source: field.path: reason'."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "spec") -> FunctionSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return FunctionSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None


def load_spec(path: str | Path) -> FunctionSpec:
    """Load a spec from YAML or JSON (by content; JSON is valid YAML)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"{p}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:  # a binary file, or another encoding: say where
        line = e.object[: e.start].count(b"\n") + 1
        raise SpecError(
            f"{p}: line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SpecError(
            f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}"
        ) from None
    if isinstance(data, dict) and data.get("kind") == "Function" and "spec" in data:
        # A Kubernetes Function resource (camelCase fields, name from metadata): read it the
        # way the controller does.
        from hearth.controller.crd import spec_from_resource

        return spec_from_resource(data, str(p))
    return parse_spec(data, str(p))
