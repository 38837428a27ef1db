"""Who owns each slot of the pool, and what follows: adopting a received slot, handing a reply
to the pool's creator (the node agent) and who handed it over, freeing a slot nobody adopted,
and reclaiming the slots of processes that are gone. A process is named by pid *and* start time
everywhere (a joined pod in another pid namespace can have a local process's pid number). A
mixin of :class:`hearth.dataplane.shm.SlotPool`, whose table, lock and header it uses."""

from __future__ import annotations

from hearth.dataplane.segment import ROW_U32, ROW_U64, USED, _Me, _my_start, pid_alive
from hearth.dataplane.slots import StaleSlot

TYPE_CHECKING = False  # no typing import on the runtime's path (issue #19)
if TYPE_CHECKING:
    from collections.abc import Collection

    from hearth.dataplane.shm import _PoolLock


class SlotOwners:
    """The ownership half of `SlotPool` (see the module docstring)."""

    creator_pid: int
    creator_start: int
    nslots: int
    classes: list[tuple[int, int, int, int]]
    _u32: memoryview
    _u64: memoryview
    _hint: memoryview
    if TYPE_CHECKING:  # (SlotPool's)

        def _locked(self) -> _PoolLock: ...
        def _row(self, slot: int, gen: int) -> None: ...
        def _free_locked(self, slot: int) -> None: ...

    def adopt(self, slot: int, gen: int) -> None:
        """Become the owner of a received slot (so it is reclaimed if *we* die)."""
        with self._locked():
            self._row(slot, gen)
            self._u32[slot * ROW_U32 + 3] = _Me.pid
            self._u64[slot * ROW_U64 + 3] = _my_start()

    def owner(self, slot: int, gen: int) -> tuple[int, int] | None:
        """The owner of a used slot, as (pid, start time), or None if it was freed since. A pid
        alone names no process: a joined pod in another pid namespace can have the same pid
        number as a local process (pid 1 in their containers)."""
        with self._locked():
            try:
                self._row(slot, gen)
            except StaleSlot:
                return None
            return int(self._u32[slot * ROW_U32 + 3]), int(self._u64[slot * ROW_U64 + 3])

    def creators(self, slot: int, gen: int) -> bool:
        """Whether the pool's creator (the node agent) owns this used slot. Lock-free, as
        `view` is: an instance asks it of each request it is sent, and leaves a slot the agent
        owns to the agent (no `adopt`, no `give_to_creator`: see `hearth.runtime.handling`)."""
        self._row(slot, gen)
        return self._is_creators(slot)

    def _is_creators(self, slot: int) -> bool:
        """The row's owner is the creator: its pid *and* start time (a joined pod in another pid
        namespace can have the agent's pid number, e.g. both pid 1 in their containers)."""
        return (
            self._u32[slot * ROW_U32 + 3] == self.creator_pid
            and self._u64[slot * ROW_U64 + 3] == self.creator_start
        )

    def give_to_creator(self, slot: int, gen: int) -> None:
        """Hand a slot to the pool's creator (the node agent) before sending it a reply: the
        reply then survives this process exiting before the agent has read it. The row
        keeps who handed it over (`handed_by`): the agent frees a stray reply's slot only when
        its sender handed that slot over."""
        with self._locked():
            self._row(slot, gen)
            b, q = slot * ROW_U32, slot * ROW_U64
            self._u32[b + 3] = self.creator_pid
            self._u32[b + 5] = _Me.pid
            self._u64[q + 3] = self.creator_start
            self._u64[q + 4] = _my_start()

    def handed_by(self, slot: int, gen: int) -> tuple[int, int] | None:
        """Who handed this used slot to the pool's creator (`give_to_creator`), as (pid, start
        time), while the creator still owns it; None otherwise. Lock-free, as `creators` is."""
        self._row(slot, gen)
        b = slot * ROW_U32
        if not self._is_creators(slot) or not self._u32[b + 5]:
            return None
        return int(self._u32[b + 5]), int(self._u64[slot * ROW_U64 + 4])

    def taken(self, slot: int, gen: int) -> None:
        """The creator took a handed-over slot as a call's answer: it names no hander any more
        (a later stray reply of the same process cannot claim it). Lock-free: only the creator
        writes a row it owns."""
        try:
            self._row(slot, gen)
        except StaleSlot:
            return  # (its reader finds that out)
        if self._is_creators(slot):
            self._u32[slot * ROW_U32 + 5] = 0
            self._u64[slot * ROW_U64 + 4] = 0

    def release_if_owner(self, slot: int, gen: int) -> bool:
        """Free a slot we sent but nobody adopted (its receiver died first); False if it was
        adopted by another process (then `reclaim_dead` frees it when that process is gone).
        A slot with another reference (`incref`: lent on to a chained call) only loses ours."""
        with self._locked():
            try:
                self._row(slot, gen)
            except StaleSlot:
                return False
            b = slot * ROW_U32
            if self._u32[b + 3] != _Me.pid or self._u64[slot * ROW_U64 + 3] != _my_start():
                return False  # (pid and start: a joined pod can share our pid number)
            rc = self._u32[b + 1] - 1
            if rc > 0:
                self._u32[b + 1] = rc
                return True
            self._free_locked(slot)
            return True

    def reclaim_dead(self, live: Collection[tuple[int, int]] = ()) -> int:
        """Free every used slot whose owner process is gone; returns how many. Also resets
        the first-free hints (a process killed inside a table update may have left one high).
        ``live``: owners, as (pid, start time), alive whatever ``/proc`` says here: processes
        in other pid namespaces (joined pods), whose pid names nobody, or another process, in
        ours; the node agent passes those whose join connection is open."""
        n = 0
        cache: dict[tuple[int, int], bool] = {k: True for k in live}
        u, u64 = self._u32, self._u64
        with self._locked():
            for i in range(self.nslots):
                if u[i * ROW_U32] != USED:
                    continue
                key = (int(u[i * ROW_U32 + 3]), int(u64[i * ROW_U64 + 3]))
                if key not in cache:
                    cache[key] = pid_alive(*key)
                if not cache[key]:
                    self._free_locked(i)
                    n += 1
            for k in range(len(self.classes)):
                self._hint[k] = 0
        return n
