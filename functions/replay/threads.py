"""A call running in a thread beside the caller's work, joined for its result."""

from __future__ import annotations

import threading
from collections.abc import Callable


class InThread:
    """``fn(*args)`` running in a thread (numpy sorts and polars release the GIL);
    ``.result()`` joins it. No reference cycles: with the GC paused during a run (see
    ``analyze.run``), its arrays are freed as soon as the analysis drops them."""

    def __init__(self, fn: Callable, *args):
        self._box: dict = {}
        self._thread = threading.Thread(target=self._target, args=(fn, args), daemon=True)
        self._thread.start()

    def _target(self, fn: Callable, args: tuple) -> None:
        try:
            self._box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self._box["error"] = e

    def result(self):
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]
