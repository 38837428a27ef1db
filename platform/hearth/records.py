"""Value classes on the instance runtime's import path, without ``dataclasses``.

``import dataclasses`` imports ``inspect`` (and with it ``ast``, ``dis``, ``tokenize``): about a
quarter of the time ``import hearth.runtime.instance`` took, paid by every instance started as a
plain process (issue #19). The few records on that path (descriptors, slots, the SDK's event,
context and response, invoke results) write their ``__init__`` out and take ``__repr__`` and
``__eq__`` from :class:`Record`, which behave as the dataclass ones did: fields in order, the
same class only, unhashable.
"""

from __future__ import annotations


class Record:
    """``__repr__`` and ``__eq__`` over the class's ``_fields`` (``_hidden`` ones are left out
    of the repr, as ``field(repr=False)`` did)."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _hidden: tuple[str, ...] = ()

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{n}={getattr(self, n)!r}" for n in self._fields if n not in self._hidden
        )
        return f"{type(self).__qualname__}({shown})"

    def _values(self) -> tuple:
        return tuple(getattr(self, n) for n in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq
