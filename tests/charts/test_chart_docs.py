"""Chart READMEs document every value: the generated table is current and covers every leaf
of values.yaml and every key the schema accepts, each with a description."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml
from chart_helpers import CHARTS

# load charts/values_doc.py by path: putting charts/ on sys.path would expose charts/hearth
_spec = importlib.util.spec_from_file_location("values_doc", CHARTS / "values_doc.py")
values_doc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(values_doc)

CHART_DIRS = [CHARTS / "hearth", CHARTS / "hearth-function"]


def value_leaves(values, schema, prefix=""):
    """Leaf keys of values.yaml: closed objects recurse, free-form maps and scalars are leaves."""
    out = []
    for k, v in values.items():
        node = schema.get("properties", {}).get(k, {})
        path = prefix + k
        if (
            isinstance(v, dict)
            and v
            and "properties" in node
            and node.get("additionalProperties") is False
        ):
            out += value_leaves(v, node, path + ".")
        else:
            out.append(path)
    return out


@pytest.mark.parametrize("chart", CHART_DIRS, ids=lambda p: p.name)
def test_readme_values_table_is_current(chart):
    assert (chart / "README.md").read_text() == values_doc.render_readme(chart), (
        f"stale: run .venv/bin/python charts/values_doc.py charts/{chart.name} --write"
    )


@pytest.mark.parametrize("chart", CHART_DIRS, ids=lambda p: p.name)
def test_every_value_is_documented_with_type_default_description(chart):
    schema = json.loads((chart / "values.schema.json").read_text())
    values = yaml.safe_load((chart / "values.yaml").read_text())
    readme = (chart / "README.md").read_text()
    rows = {}
    for line in readme.split(values_doc.START)[1].split(values_doc.END)[0].splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells
    leaves = value_leaves(values, schema)
    assert leaves, "no values found"
    for key in leaves:
        assert key in rows, f"{chart.name}: value {key} is not in README.md"
    for key, (_, typ, default, desc) in rows.items():
        assert typ and default and len(desc) > 5, (
            f"{chart.name}: {key} lacks type/default/description"
        )
    schema_keys = {k for k, _ in values_doc.leaves(schema)} - {"global"}
    assert schema_keys == set(rows), "README rows and schema keys differ"


def test_values_without_schema_entry_are_rejected_by_design():
    # additionalProperties: false at every closed level, so a typo can't be silently ignored
    for chart in CHART_DIRS:
        schema = json.loads((chart / "values.schema.json").read_text())

        def walk(node, path, name=chart.name):
            if "properties" in node:
                assert node.get("additionalProperties") is False, f"{name}:{path} is open"
                for k, sub in node["properties"].items():
                    walk(sub, f"{path}.{k}")
            if isinstance(node.get("items"), dict):
                walk(node["items"], path + "[]")

        walk(schema, "")
