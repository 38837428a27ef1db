"""The fast path's check before asking `sheds` (`FastPath.shed`): with fewer than
LATE_TICKS - 1 late ticks in a row, `sheds` says no whatever the clock and however long the
lag has lasted, so the fast path answers that without a clock read (#19). Checked on the pure
decision core over a grid of states and times: if `sheds` ever said yes below that count, the
precheck would skip a 503 the node owes."""

from __future__ import annotations

import itertools

from hearth.gateway.shed import LATE_TICKS, LagState, record_tick, sheds


def test_below_the_precheck_count_sheds_never_says_yes() -> None:
    limit = 0.05
    for late, behind, overdue, lasted in itertools.product(
        range(LATE_TICKS - 1),  # what the precheck lets through without asking
        (False, True),
        (0.0, limit / 2, limit * 1.01, 1.0, 1e6),  # how far past the pending tick's due time
        (0.0, limit, 4 * limit, 1e6),  # how long the run of late ticks has lasted
    ):
        due = 1000.0
        st = LagState(due=due, late_ticks=late, behind_since=due - lasted if behind else None)
        assert not sheds(st, due + overdue, limit), (late, behind, overdue, lasted)


def test_at_the_precheck_count_sheds_can_say_yes() -> None:
    """The count is the lowest that can shed: a run of LATE_TICKS - 1 late ticks held past the
    HOLD bound, with the pending tick overdue too, sheds (so the precheck is no looser)."""
    limit, interval = 0.05, 0.005
    st = LagState(due=0.0)
    now = 0.0
    for _ in range(LATE_TICKS - 1):  # each tick runs a whole limit late
        now = st.due + 2 * limit
        record_tick(st, now, limit, interval)
    assert st.late_ticks == LATE_TICKS - 1
    assert sheds(st, st.behind_since + 1e3, limit)
