"""The front gateway's calls that are connecting to a node agent right now, so that those whose
agent is marked down meanwhile fail over at once.

Why: a dead node's address may not even refuse, so a connect to it waits out its timeout (2 s).
The first call whose connect fails marks the agent down (`health.AgentHealth`) and the calls
after it try that agent last; but the calls already connecting to it then each waited out their
own connect timeout before failing over, up to 2 s more for calls that arrived just before. Now
marking an agent down (a connect failure, a call lost mid-request, a failed probe) aborts its
calls whose connection is not made yet, and they fail over at once. A call that is connected is
never aborted: its request may have been sent, and retrying it could run a function twice (the
rule of `forward.Forward`). The connection is known made in the connector (`Connector.connect`
runs in the call's task): no aiohttp trace, whose signals cost every call ~10 awaits.

Only a call with somewhere else to go is aborted: one with an agent left to try that is not down
(`to_abort`). A lone agent slow to accept under load is marked down by the first connect that
times out; aborting the others would answer them 502 at once, when they might have connected
within their own bound. They connect on, to that bound."""

from __future__ import annotations

import asyncio
from collections.abc import Container, Iterable, Sequence
from typing import Any

import aiohttp


class ConnectAborted(aiohttp.ClientError):
    """The call's agent was marked down while the call was connecting to it: nothing was sent."""


def to_abort(
    calls: Iterable[tuple[asyncio.Task, Sequence[str]]], down: Container[str]
) -> list[asyncio.Task]:
    """Of the calls connecting to an agent just marked down (each with the agents it would try
    after it), those to abort: the ones with an agent left to try that is not down."""
    return [t for t, rest in calls if any(u not in down for u in rest)]


class Connecting:
    """The calls connecting right now, by agent URL (each the task that connects, with the
    agents the call would try next); `down(url, down)` is `AgentHealth`'s `on_down`."""

    def __init__(self) -> None:
        self.by_agent: dict[str, dict[asyncio.Task, Sequence[str]]] = {}
        self.aborted: set[asyncio.Task] = set()
        self.aborts = 0  # connects aborted so far (each failed over at once)

    def connector(self, **kw: Any) -> Connector:
        """The connector of the session the calls go out on (`kw`: TCPConnector's)."""
        return Connector(self, **kw)

    def made(self, task: asyncio.Task | None) -> None:
        """`task` has its connection: it can no longer be aborted (it may send its request)."""
        for tasks in self.by_agent.values():
            tasks.pop(task, None)  # type: ignore[arg-type]

    def down(self, url: str, down: Container[str]) -> None:
        """`url` was marked down (`down`: every agent down now): abort the calls still connecting
        to it that can fail over to an agent that is not down; the others connect on."""
        calls = self.by_agent.get(url)
        if not calls:
            return
        for t in to_abort(list(calls.items()), down):
            del calls[t]  # aborted once: never again
            if not t.done():
                self.aborted.add(t)
                self.aborts += 1
                t.cancel()

    async def request(
        self,
        session: aiohttp.ClientSession,
        base: str,
        rest: Sequence[str],
        method: str,
        url: str,
        **kw: Any,
    ) -> aiohttp.ClientResponse:
        """`session.request(method, url, **kw)` to the agent at `base` (its response, to be used
        as a context); raises `ConnectAborted` if `base` is marked down before the connection
        is made while one of `rest` (the agents the call tries next) is not."""
        t = asyncio.ensure_future(session.request(method, url, **kw))
        calls = self.by_agent.setdefault(base, {})
        calls[t] = rest
        try:
            return await t
        except asyncio.CancelledError:
            if t.done() and not t.cancelled() and t.exception() is None:
                t.result().release()  # answered just as this call was cancelled
            me = asyncio.current_task()
            if t in self.aborted and (me is None or not me.cancelling()):
                raise ConnectAborted(f"{base} was marked down while connecting") from None
            raise
        finally:
            self.aborted.discard(t)
            calls.pop(t, None)
            if not calls and self.by_agent.get(base) is calls:
                del self.by_agent[base]


class Connector(aiohttp.TCPConnector):
    """Tells `Connecting` when a call's connection is made (in the call's own task)."""

    def __init__(self, connecting: Connecting, **kw: Any) -> None:
        super().__init__(**kw)
        self._connecting = connecting

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        conn = await super().connect(req, traces, timeout)
        self._connecting.made(asyncio.current_task())  # (same step: no await in between)
        return conn
