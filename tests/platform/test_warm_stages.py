"""scripts/warm_stages.py's following of a request through the traced events (`follow`):
each stage's time in order, an on-CPU step skipped when its process was running already, and a
request cut short by the next one dropped."""

from __future__ import annotations

from benchmark_module import SCRIPTS, load_benchmark

ws = load_benchmark("warm_stages", SCRIPTS)
A, N, C = 10, 20, 30  # thread ids of the agent, the instance, the client
ROLES = {A: ws.AGENT, N: ws.INSTANCE, C: ws.CLIENT}


def _one(t0: int, agent_running: bool = False) -> list[tuple]:
    """The events of one request from t0 us, one a microsecond (ts in ns, tid, kind, syscall
    or cpu, ret, cpu)."""
    ev = [
        (0, C, ws.ENTER, ws.SENDTO, 0, 1),
        (1, A, ws.WAKEUP, 0, 0, 1),
        (2, A, ws.ON_CPU, 0, 0, 0),
        (3, A, ws.EXIT, ws.RECVFROM, 85, 0),
        (4, A, ws.ENTER, ws.SENDTO, 0, 0),
        (5, A, ws.EXIT, ws.SENDTO, 64, 0),
        (6, N, ws.ON_CPU, 0, 0, 0),
        (7, N, ws.EXIT, ws.RECVFROM, 64, 0),
        (8, N, ws.ENTER, ws.SENDTO, 0, 0),
        (9, A, ws.ON_CPU, 0, 0, 0),
        (10, A, ws.EXIT, ws.RECVFROM, 64, 0),
        (11, A, ws.ENTER, ws.SENDTO, 0, 0),
        (12, C, ws.ON_CPU, 0, 0, 1),
        (13, C, ws.EXIT, ws.RECVFROM, 313, 1),
    ]
    if agent_running:  # the agent was on its CPU already: no switch onto it
        ev = [e for e in ev if not (e[1] == A and e[2] == ws.ON_CPU and e[0] == 2)]
    return [((t0 + ts) * 1000, *rest) for ts, *rest in ev]


def test_a_request_is_followed_stage_by_stage():
    end = [(300_000, C, ws.ENTER, ws.SENDTO, 0, 1)]
    rows = _one(100) + _one(200, agent_running=True) + end
    (first, second) = ws.follow(rows, ROLES)
    assert first[0] == [(100 + t) * 1000 for t in range(14) if t != 1]  # the wake-up is not a step
    assert second[0][1] is None and second[0][2] == 203_000  # skipped on-CPU step, then its read
    assert first[1][ws.STEPS.index(("client on CPU", ws.CLIENT, ws.ON_CPU, None))] == 1
    out = ws.report([first, second], "t")
    assert out["requests"] == 2 and out["total_us"] == 13.0
    # 1 us after its switch onto the CPU; 3 after the sendto when it was running already
    assert out["agent read the request"] == 2.0


def test_a_request_cut_short_by_the_next_is_dropped():
    cut = _one(100)[:6]  # no reply: the client sent again
    rows = cut + _one(200) + [(300_000, C, ws.ENTER, ws.SENDTO, 0, 1)]
    (only,) = ws.follow(rows, ROLES)
    assert only[0][0] == 200_000
