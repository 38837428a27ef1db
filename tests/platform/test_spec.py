"""The function spec: defaults, validation messages naming the field, YAML/JSON/Function loading."""

from __future__ import annotations

import pytest
from hearth.spec import FunctionSpec, SpecError, load_spec, parse_spec


def test_defaults_are_sane():
    s = parse_spec({"name": "f", "handler": "m:h"})
    assert s.concurrency == 1 and s.min_instances == 0 and s.max_instances >= 1
    assert s.keep_alive.policy == "fixed" and s.keep_alive.ttl_s == 60
    assert [t.type for t in s.triggers] == ["http"]


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"name": "Has_Upper"}, "name"),
        ({"handler": "nocolon"}, "handler"),
        ({"concurrency": 0}, "concurrency"),
        ({"timeout_s": -1}, "timeout_s"),
        ({"resources": {"memory_mb": 0}}, "resources.memory_mb"),
        ({"keep_alive": {"policy": "forever"}}, "keep_alive.policy"),
        ({"triggers": [{"type": "redis-stream"}]}, "triggers.0.redis-stream.stream"),
        ({"triggers": [{"type": "carrier-pigeon"}]}, "triggers.0"),
        ({"env": {"1BAD": "x"}}, "env"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"min_instances": 3, "max_instances": 1}, "min_instances"),
    ],
)
def test_bad_specs_name_the_field(patch, field):
    with pytest.raises(SpecError) as e:
        parse_spec({"name": "f", "handler": "m:h", **patch}, "my.yaml")
    assert f"my.yaml: {field}" in str(e.value) or field in str(e.value)
    assert "Traceback" not in str(e.value)


def test_load_yaml_json_and_function_resource(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nhandler: m:h\nconcurrency: 3\n")
    assert load_spec(tmp_path / "a.yaml").concurrency == 3
    (tmp_path / "b.json").write_text('{"name": "b", "handler": "m:h"}')
    assert load_spec(tmp_path / "b.json").name == "b"
    (tmp_path / "c.yaml").write_text(
        "apiVersion: hearth.dev/v1alpha1\nkind: Function\nmetadata: {name: c}\nspec: {handler: 'm:h'}\n"
    )
    assert load_spec(tmp_path / "c.yaml").name == "c"


def test_load_errors_are_one_clear_message(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(tmp_path / "list.yaml")


def test_round_trip():
    s = parse_spec(
        {
            "name": "f",
            "handler": "m:h",
            "triggers": [{"type": "http"}, {"type": "redis-stream", "stream": "in"}],
        }
    )
    assert FunctionSpec.model_validate(s.to_dict()) == s
    assert [t.stream for t in s.stream_triggers()] == ["in"]


def test_an_instance_is_given_the_fields_its_runtime_reads():
    from hearth.agent.runner import instance_spec
    from hearth.runtime.instance import RunSpec

    s = parse_spec(
        {
            "name": "f",
            "handler": "m:h",
            "init": "m:setup",
            "code_path": "/code",
            "env": {"A": "1"},
            "concurrency": 4,
            "timeout_s": 5,
            "labels": {"team": "x"},
            "invoke_token": "t" * 32,
        }
    )
    given = instance_spec(s)
    assert set(given) == set(RunSpec._fields)  # nothing more (never the invoke token)
    run = RunSpec.from_dict(given)
    assert (run.name, run.handler, run.init, run.code_path) == ("f", "m:h", "m:setup", "/code")
    assert (run.env, run.concurrency, run.timeout_s) == ({"A": "1"}, 4, 5.0)
