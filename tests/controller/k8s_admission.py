"""What a real API server checks before it stores an object, for the emulator (k8s_emulator.py)
and the chart tests: object names, label keys and values, pod specs (the fields Hearth writes)
and pod immutability, custom resources against their CRD's openAPIV3Schema (pruning, defaulting,
types and bounds) and the CRD's CEL rules evaluated by a real CEL implementation (cel-python).

Each check follows the apimachinery validation it is named after; messages use the API
server's `field: reason` form so tests can match them. What is *not* here: admission webhooks,
quota, Pod Security admission, the CEL cost budget (cel-python has no cost estimator).
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
from typing import Any

import celpy
import jsonschema

DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = rf"{DNS1123_LABEL}(\.{DNS1123_LABEL})*"
LABEL_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
QUANTITY = r"[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?\d+)?"
ENV_NAME = r"[-._a-zA-Z][-._a-zA-Z0-9]*"
DATA_KEY = r"[-._a-zA-Z0-9]+"  # Secret and ConfigMap keys


class Invalid(Exception):
    """422 Unprocessable Entity: `causes` are `field: reason` strings."""

    def __init__(self, causes: list[str], code: int = 422, reason: str = "Invalid") -> None:
        super().__init__("; ".join(causes))
        self.causes, self.code, self.reason = causes, code, reason


def dns_subdomain_problem(v: Any) -> str | None:
    if not isinstance(v, str) or not re.fullmatch(DNS1123_SUBDOMAIN, v) or len(v) > 253:
        return "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (<= 253)"
    return None


def dns_label_problem(v: Any) -> str | None:
    if not isinstance(v, str) or not re.fullmatch(DNS1123_LABEL, v) or len(v) > 63:
        return "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (<= 63)"
    return None


def qualified_name_problem(k: Any) -> str | None:
    """Label and annotation keys: optional DNS-subdomain prefix + '/' + name (<= 63)."""
    if not isinstance(k, str):
        return "must be a string"
    prefix, _, name = k.rpartition("/")
    if "/" in k and (not prefix or dns_subdomain_problem(prefix)):
        return "prefix part must be a DNS-1123 subdomain"
    if not name or len(name) > 63 or not re.fullmatch(LABEL_NAME, name):
        return "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (<= 63)"
    return None


def label_value_problem(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a string"
    if v and (len(v) > 63 or not re.fullmatch(LABEL_NAME, v)):
        return "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (<= 63)"
    return None


def validate_metadata(meta: dict[str, Any], name_check=dns_subdomain_problem) -> list[str]:
    errs = []
    if not meta.get("name"):
        errs.append("metadata.name: Required value: name or generateName is required")
    elif p := name_check(meta["name"]):
        errs.append(f"metadata.name: Invalid value: {meta['name']!r}: {p}")
    for k, v in (meta.get("labels") or {}).items():
        if p := qualified_name_problem(k):
            errs.append(f"metadata.labels: Invalid value: {k!r}: {p}")
        if p := label_value_problem(v):
            errs.append(f"metadata.labels: Invalid value: {v!r}: {p}")
    ann = meta.get("annotations") or {}
    for k, v in ann.items():
        if p := qualified_name_problem(k):
            errs.append(f"metadata.annotations: Invalid value: {k!r}: {p}")
        if not isinstance(v, str):
            errs.append(f"metadata.annotations.{k}: Invalid value: must be a string")
    if sum(len(k) + len(str(v)) for k, v in ann.items()) > 256 * 1024:
        errs.append("metadata.annotations: Too long: must have at most 262144 bytes")
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for f in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(f):
                errs.append(f"metadata.ownerReferences[{i}].{f}: Required value")
    if sum(1 for r in meta.get("ownerReferences") or [] if r.get("controller")) > 1:
        errs.append(
            "metadata.ownerReferences: Invalid value: only one reference can have Controller set to true"
        )
    return errs


def _quantities(res: dict[str, Any], path: str) -> list[str]:
    errs = []
    for section in ("requests", "limits"):
        for k, v in (res.get(section) or {}).items():
            if not isinstance(v, str | int) or not re.fullmatch(QUANTITY, str(v)):
                errs.append(
                    f"{path}.{section}[{k}]: Invalid value: {v!r}: quantities must match the regular expression"
                )
    return errs


_VALUE_SOURCES = ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef")


def _value_from(vf: Any, path: str) -> list[str]:
    """EnvVarSource: exactly one source; a key ref names a valid object and key."""
    if vf is None:
        return []
    if not isinstance(vf, dict):
        return [f"{path}: Invalid value: must be an object"]
    given = [k for k in _VALUE_SOURCES if vf.get(k) is not None]
    errs = []
    if len(given) != 1:
        errs.append(f"{path}: Invalid value: may not have more than one field specified at a time")
    for k in ("configMapKeyRef", "secretKeyRef"):
        ref = vf.get(k)
        if ref is None:
            continue
        if not ref.get("key"):
            errs.append(f"{path}.{k}.key: Required value")
        elif not re.fullmatch(DATA_KEY, str(ref["key"])):
            errs.append(f"{path}.{k}.key: Invalid value: {ref['key']!r}")
        if not ref.get("name"):
            errs.append(f"{path}.{k}.name: Required value")
        elif p := dns_subdomain_problem(ref["name"]):
            errs.append(f"{path}.{k}.name: Invalid value: {ref['name']!r}: {p}")
    return errs


def _data_keys(data: Any, path: str) -> list[str]:
    errs = []
    for k in data or {}:
        if not re.fullmatch(DATA_KEY, k) or len(k) > 253:
            errs.append(
                f"{path}: Invalid value: {k!r}: a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
            )
    return errs


def admit_secret(obj: dict[str, Any]) -> dict[str, Any]:
    """ValidateSecret: name, data keys, base64 values (stringData is merged into data, as the API
    server does), at most 1 MiB of data; type defaults to Opaque."""
    errs = validate_metadata(obj.get("metadata") or {})
    data = dict(obj.get("data") or {})
    errs += _data_keys(data, "data")
    for k, v in data.items():
        try:
            base64.b64decode(str(v), validate=True)
        except (ValueError, binascii.Error):
            errs.append(f"data[{k}]: Invalid value: illegal base64 data")
    for k, v in (obj.pop("stringData", None) or {}).items():
        errs += _data_keys({k: v}, "stringData")
        data[k] = base64.b64encode(str(v).encode()).decode()
    if sum(len(str(v)) * 3 // 4 for v in data.values()) > 1 << 20:
        errs.append("data: Too long: must have at most 1048576 bytes")
    if errs:
        raise Invalid(errs)
    obj["data"] = data
    obj.setdefault("type", "Opaque")
    return obj


def admit_config_map(obj: dict[str, Any]) -> dict[str, Any]:
    """ValidateConfigMap: name, keys of data and binaryData (no key in both), string values."""
    errs = validate_metadata(obj.get("metadata") or {})
    data, binary = obj.get("data") or {}, obj.get("binaryData") or {}
    errs += _data_keys(data, "data") + _data_keys(binary, "binaryData")
    errs += [
        f"data[{k}]: Invalid value: must be a string"
        for k, v in data.items()
        if not isinstance(v, str)
    ]
    errs += [
        f"data[{k}]: Invalid value: duplicate of key present in binaryData"
        for k in set(data) & set(binary)
    ]
    if errs:
        raise Invalid(errs)
    return obj


def _probe(p: dict[str, Any] | None, path: str) -> list[str]:
    if p is None:
        return []
    handlers = [h for h in ("exec", "httpGet", "tcpSocket", "grpc") if h in p]
    if len(handlers) != 1:
        return [f"{path}: Required value: must specify exactly one handler type"]
    if "exec" in handlers and not (p["exec"].get("command")):
        return [f"{path}.exec.command: Required value"]
    return []


def validate_pod(pod: dict[str, Any]) -> list[str]:
    """The parts of ValidatePodCreate that Hearth's pods exercise."""
    errs = validate_metadata(pod.get("metadata") or {})
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        errs.append("spec.containers: Required value")
    volumes = {}
    for i, v in enumerate(spec.get("volumes") or []):
        if p := dns_label_problem(v.get("name")):
            errs.append(f"spec.volumes[{i}].name: Invalid value: {v.get('name')!r}: {p}")
        if v.get("name") in volumes:
            errs.append(f"spec.volumes[{i}].name: Duplicate value: {v.get('name')!r}")
        volumes[v.get("name")] = v
        if "hostPath" in v and not str(v["hostPath"].get("path", "")).startswith("/"):
            errs.append(f"spec.volumes[{i}].hostPath.path: Invalid value: must be absolute")
    names: set[str] = set()
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(kind) or []):
            path = f"spec.{kind}[{i}]"
            if p := dns_label_problem(c.get("name")):
                errs.append(f"{path}.name: Invalid value: {c.get('name')!r}: {p}")
            if c.get("name") in names:
                errs.append(f"{path}.name: Duplicate value: {c.get('name')!r}")
            names.add(c.get("name"))
            if not c.get("image"):
                errs.append(f"{path}.image: Required value")
            for j, e in enumerate(c.get("env") or []):
                if not re.fullmatch(ENV_NAME, str(e.get("name", ""))):
                    errs.append(f"{path}.env[{j}].name: Invalid value: {e.get('name')!r}")
                if "value" in e and "valueFrom" in e:
                    errs.append(
                        f"{path}.env[{j}].valueFrom: Invalid value: may not be specified when `value` is not empty"
                    )
                errs += _value_from(e.get("valueFrom"), f"{path}.env[{j}].valueFrom")
            for j, m in enumerate(c.get("volumeMounts") or []):
                if m.get("name") not in volumes:
                    errs.append(f"{path}.volumeMounts[{j}].name: Not found: {m.get('name')!r}")
                if not str(m.get("mountPath", "")).startswith("/"):
                    errs.append(
                        f"{path}.volumeMounts[{j}].mountPath: Invalid value: must be absolute"
                    )
            errs += _quantities(c.get("resources") or {}, f"{path}.resources")
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                errs += _probe(c.get(probe), f"{path}.{probe}")
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is False and (
                sc.get("privileged")
                or "SYS_ADMIN" in ((sc.get("capabilities") or {}).get("add") or [])
            ):
                errs.append(
                    f"{path}.securityContext: Invalid value: cannot set `allowPrivilegeEscalation` to false and `privileged` or CAP_SYS_ADMIN"
                )
    if spec.get("restartPolicy", "Always") not in ("Always", "OnFailure", "Never"):
        errs.append(f"spec.restartPolicy: Unsupported value: {spec.get('restartPolicy')!r}")
    return errs


# Pod fields that may change after creation (ValidatePodUpdate); everything else is immutable.
_POD_MUTABLE = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")


def validate_pod_update(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    errs = validate_metadata(new.get("metadata") or {})
    o, n = copy.deepcopy(old.get("spec") or {}), copy.deepcopy(new.get("spec") or {})
    for s in (o, n):
        for k in _POD_MUTABLE:
            s.pop(k, None)
        for c in s.get("containers") or []:
            c.pop("image", None)
        s.pop("nodeName", None)  # set by the scheduler (binding), not a client update
    if o != n:
        errs.append(
            "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations) or `spec.terminationGracePeriodSeconds`"
        )
    return errs


# --- custom resources: structural schema + CEL ---------------------------------------------


def _to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """Kubernetes structural schema -> draft-4 JSON schema (nullable honoured; pruning and
    unknown fields are handled before, by `prune_and_default`)."""
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k.startswith("x-kubernetes-") or k in ("nullable", "default", "format"):
            continue
        if k == "properties":
            out["properties"] = {pk: _to_jsonschema(pv) for pk, pv in v.items()}
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = _to_jsonschema(v)
        else:
            out[k] = copy.deepcopy(v)
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def prune_and_default(obj: Any, node: dict[str, Any], path: str, unknown: list[str]) -> Any:
    """What the API server does to a structural object: unknown fields are dropped (and listed
    in `unknown`), absent fields with a default get it. `metadata` at the root is left alone."""
    if isinstance(obj, dict) and node.get("type") == "object":
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return obj
        props = node.get("properties")
        if props is not None:
            out = {}
            for k, v in obj.items():
                if k in props:
                    sub = props[k]
                    out[k] = (
                        v
                        if k == "metadata" and not path
                        else prune_and_default(v, sub, f"{path}.{k}" if path else k, unknown)
                    )
                else:
                    unknown.append(f"{path}.{k}" if path else k)
            for k, sub in props.items():
                if k not in out and "default" in sub:
                    out[k] = prune_and_default(
                        copy.deepcopy(sub["default"]), sub, f"{path}.{k}", unknown
                    )
            return out
        if isinstance(node.get("additionalProperties"), dict):
            return {
                k: prune_and_default(v, node["additionalProperties"], f"{path}[{k}]", unknown)
                for k, v in obj.items()
            }
        return obj
    if isinstance(obj, list) and "items" in node:
        return [
            prune_and_default(v, node["items"], f"{path}[{i}]", unknown) for i, v in enumerate(obj)
        ]
    return obj


class CustomResourceAdmission:
    """Admission of one CRD's objects as the apiextensions API server does it. Compiling the
    CEL rules happens here, as the API server does when the CRD is created: a rule real CEL
    cannot parse makes the CRD itself invalid."""

    def __init__(self, crd: dict[str, Any]) -> None:
        self.crd = crd
        self.env = celpy.Environment()
        self.versions = {
            v["name"]: v["schema"]["openAPIV3Schema"]
            for v in crd["spec"]["versions"]
            if v.get("served")
        }
        self.programs: dict[str, Any] = {}
        for schema in self.versions.values():
            for rule in _rules(schema):
                self._program(rule["rule"])

    def _program(self, rule: str):
        if rule not in self.programs:
            self.programs[rule] = self.env.program(self.env.compile(rule))
        return self.programs[rule]

    def admit(self, obj: dict[str, Any], strict: bool = False) -> tuple[dict[str, Any], list[str]]:
        """The object as stored (pruned, defaulted) and the warnings; raises Invalid."""
        version = str(obj.get("apiVersion", "")).rpartition("/")[2]
        schema = self.versions.get(version)
        if schema is None:
            raise Invalid(
                [f"apiVersion: Invalid value: {obj.get('apiVersion')!r}: not served"],
                400,
                "BadRequest",
            )
        errs = validate_metadata(obj.get("metadata") or {})
        unknown: list[str] = []
        stored = prune_and_default(obj, schema, "", unknown)
        if unknown and strict:
            raise Invalid([f"{u}: unknown field" for u in unknown], 422, "Invalid")
        for e in jsonschema.Draft4Validator(_to_jsonschema(schema)).iter_errors(stored):
            where = ".".join(str(p) for p in e.absolute_path) or "<root>"
            errs.append(f"{where}: Invalid value: {e.message}")
        if not errs:
            errs += self.cel_errors(schema, stored, "")
        if errs:
            raise Invalid(errs)
        return stored, [f'unknown field "{u}"' for u in unknown]

    def cel_errors(self, node: dict[str, Any], value: Any, path: str) -> list[str]:
        errs = []
        if value is None:
            return errs
        for rule in node.get("x-kubernetes-validations", []):
            v = value
            if not path and isinstance(value, dict):  # root rules see only name/generateName
                meta = value.get("metadata") or {}
                v = {
                    **value,
                    "metadata": {k: meta[k] for k in ("name", "generateName") if k in meta},
                }
            try:
                ok = self._program(rule["rule"]).evaluate({"self": celpy.json_to_cel(v)})
            except celpy.CELEvalError as e:
                ok = e
            if ok is not True and not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
                errs.append(
                    f"{path or '<root>'}: Invalid value: {rule.get('message') or rule['rule']}"
                )
        if isinstance(value, dict):
            for k, sub in (node.get("properties") or {}).items():
                if k in value:
                    errs += self.cel_errors(sub, value[k], f"{path}.{k}" if path else k)
            if isinstance(node.get("additionalProperties"), dict):
                for k, v in value.items():
                    errs += self.cel_errors(node["additionalProperties"], v, f"{path}[{k}]")
        elif isinstance(value, list) and "items" in node:
            for i, item in enumerate(value):
                errs += self.cel_errors(node["items"], item, f"{path}[{i}]")
        return errs


def _rules(node: dict[str, Any]):
    yield from node.get("x-kubernetes-validations", [])
    for sub in (node.get("properties") or {}).values():
        yield from _rules(sub)
    for k in ("items", "additionalProperties"):
        if isinstance(node.get(k), dict):
            yield from _rules(node[k])


# --- patches ---------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
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


def _pointer(doc: Any, ptr: str) -> tuple[Any, str | int]:
    if not ptr.startswith("/"):
        raise Invalid([f"json patch: invalid path {ptr!r}"])
    parts = [p.replace("~1", "/").replace("~0", "~") for p in ptr[1:].split("/")]
    for p in parts[:-1]:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    last: str | int = parts[-1]
    if isinstance(doc, list) and last != "-":
        last = int(last)
    return doc, last


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    if not isinstance(ops, list):
        raise Invalid(
            ["json patch: the body must be a JSON array of operations"], 400, "BadRequest"
        )
    doc = copy.deepcopy(target)
    for op in ops:
        try:
            kind, path = op["op"], op["path"]
            if kind in ("move", "copy"):
                src, key = _pointer(doc, op["from"])
                value = copy.deepcopy(src[key])
                if kind == "move":
                    del src[key]
                kind, op = "add", {"path": path, "value": value}
            parent, key = _pointer(doc, path) if path else (None, "")
            if kind == "test":
                if parent[key] != op["value"]:
                    raise Invalid([f"json patch: test failed at {path}"])
            elif kind == "remove":
                del parent[key]
            elif kind == "replace":
                parent[key]  # noqa: B018 - must exist
                parent[key] = op["value"]
            elif kind == "add":
                if isinstance(parent, list):
                    parent.insert(len(parent) if key == "-" else key, op["value"])
                else:
                    parent[key] = op["value"]
            else:
                raise Invalid([f"json patch: unknown op {kind!r}"])
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise Invalid([f"json patch: cannot apply {op!r}: {type(e).__name__}"]) from None
    return doc


# Merge keys of the list fields a strategic merge patch of a Pod can touch (from the Go types'
# patchMergeKey tags); lists without one are replaced whole.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "conditions": "type",
    "ownerReferences": "uid",
    "finalizers": None,  # set semantics: merged as a set of strings
}


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch for built-in kinds: maps merge, lists with a merge key merge by
    it (`$patch: delete` removes an element), `$patch: replace` replaces, other lists replace."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: v for k, v in copy.deepcopy(patch).items() if k != "$patch"}
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if k.startswith("$"):
            continue
        if v is None:
            out.pop(k, None)
        elif isinstance(v, list) and k in _MERGE_KEYS and isinstance(out.get(k), list):
            key = _MERGE_KEYS[k]
            cur = copy.deepcopy(out[k])
            if key is None:
                out[k] = cur + [x for x in v if x not in cur]
                continue
            for item in v:
                idx = next((i for i, c in enumerate(cur) if c.get(key) == item.get(key)), None)
                if item.get("$patch") == "delete":
                    if idx is not None:
                        del cur[idx]
                elif idx is None:
                    cur.append(copy.deepcopy(item))
                else:
                    cur[idx] = strategic_merge_patch(cur[idx], item)
            out[k] = cur
        else:
            out[k] = strategic_merge_patch(out.get(k), v)
    return out
