"""Contract every controller backend passes. Use it by subclassing with a `backend` fixture:

class TestMyBackend(BackendContract):
    @pytest.fixture
    async def backend(self):
        yield MyBackend(...)
"""

from __future__ import annotations

import asyncio
import time

import pytest
from hearth.spec import parse_spec


def contract_spec(name: str = "contract-fn"):
    return parse_spec(
        {
            "name": name,
            "handler": "mod:handler",
            "resources": {"memory_mb": 128, "cpu_millicores": 100},
        }
    )


async def eventually(fn, timeout: float = 20.0, interval: float = 0.05):
    """Poll an async predicate until it returns a truthy value (backends are eventually consistent)."""
    deadline = time.monotonic() + timeout
    while True:
        v = await fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


class BackendContract:
    """The behaviour the decision core relies on."""

    async def test_starts_empty_and_each_start_adds_exactly_one(self, backend):
        """What the decision core counts on: instances() lists exactly what was started."""
        before = {i.id for i in await backend.instances()}
        assert "contract-fn-0" not in before
        node = (await backend.nodes())[0].name
        h = await backend.start_instance(contract_spec(), node, "contract-fn-0")
        assert h.id == "contract-fn-0"

        async def added():
            ids = {i.id for i in await backend.instances()}
            return ids - before if ids - before else None

        assert await eventually(added) == {"contract-fn-0"}

    async def test_nodes_have_names_and_capacity(self, backend):
        nodes = await backend.nodes()
        assert nodes
        assert len({n.name for n in nodes}) == len(nodes)
        assert all(n.cpu_millicores > 0 and n.memory_mb > 0 for n in nodes)

    async def test_start_then_listed_on_that_node(self, backend):
        node = (await backend.nodes())[0].name
        h = await backend.start_instance(contract_spec(), node, "contract-fn-1")
        assert h.id == "contract-fn-1" and h.node == node and h.function == "contract-fn"

        async def listed():
            return [i for i in await backend.instances() if i.id == "contract-fn-1"]

        (inst,) = await eventually(listed)
        assert inst.function == "contract-fn" and inst.node == node
        assert inst.state in ("starting", "idle", "busy")

    async def test_stop_removes_and_is_idempotent(self, backend):
        node = (await backend.nodes())[0].name
        await backend.start_instance(contract_spec(), node, "contract-fn-2")
        await backend.stop_instance("contract-fn-2")

        async def gone():  # `stopping` may be seen on the way, but it must end: not listed
            return all(i.id != "contract-fn-2" for i in await backend.instances())

        await eventually(gone)
        await backend.stop_instance("contract-fn-2")  # again: no error
        await backend.stop_instance("never-existed")

    async def test_unknown_node_is_rejected(self, backend):
        with pytest.raises(ValueError, match="node"):
            await backend.start_instance(contract_spec(), "no-such-node", "contract-fn-3")

    async def test_duplicate_id_is_rejected(self, backend):
        node = (await backend.nodes())[0].name
        await backend.start_instance(contract_spec(), node, "contract-fn-4")
        with pytest.raises(ValueError, match="already exists"):
            await backend.start_instance(contract_spec(), node, "contract-fn-4")
