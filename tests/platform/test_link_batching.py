"""The agent link's sends (`DataplaneLink._post`): the first descriptor of a loop step leaves
at once; later ones of the same step share one send; a lone call schedules no flush pass.
The endpoint here records what would go to its socket (the real socket path is covered by the
end-to-end tests); the event loop is real."""

from __future__ import annotations

import asyncio

from hearth.agent.link import DataplaneLink
from hearth.dataplane.descriptor import Descriptor


class Recorder:
    """Stands for the endpoint's non-blocking send: every send_now is one sendmsg."""

    def __init__(self) -> None:
        self.sends: list[list[int]] = []

    def send_now(self, ds: list[Descriptor]) -> list[Descriptor]:
        self.sends.append([d.dst for d in ds])
        return []


def link() -> tuple[DataplaneLink, Recorder]:
    lk = DataplaneLink(pool=None, proxy_socket="")  # type: ignore[arg-type]
    lk._loop = asyncio.get_running_loop()
    lk.ep = rec = Recorder()  # type: ignore[assignment]
    return lk, rec


async def test_posts_of_one_loop_step_after_the_first_share_one_send() -> None:
    lk, rec = link()

    async def post(dst: int) -> None:
        lk._post(Descriptor(dst=dst))

    # three requests handled in the same loop step (their tasks were all ready at once)
    await asyncio.gather(post(7), post(7), post(7))
    await asyncio.sleep(0)  # the flush's pass
    assert rec.sends == [[7], [7, 7]]


async def test_a_lone_post_is_sent_at_once_without_a_flush_pass() -> None:
    lk, rec = link()
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    ready_before = len(loop._ready)  # type: ignore[attr-defined]
    lk._post(Descriptor(dst=3))
    assert rec.sends == [[3]]
    assert not lk._flush_scheduled
    assert len(loop._ready) == ready_before  # type: ignore[attr-defined]  # no extra loop pass
