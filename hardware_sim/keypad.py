"""A simulated driver's keypad on a pty: a 4x4 matrix keypad module that sends one ASCII character per key
(``0``-``9``, ``*``, ``#``, ``A``-``D``), as the cheap serial keypads on bus dashboards do. The validator opens
``serial:<.path>``; a test presses keys with ``press("4")``, ``press("12#")``."""

from __future__ import annotations

import os
import tty
from typing import Self

KEYS = frozenset("0123456789*#ABCD")


class SimKeypad:
    def __init__(self):
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)

    def press(self, keys: str) -> None:
        unknown = set(keys) - KEYS
        if unknown:
            raise ValueError(f"a keypad has no key {''.join(sorted(unknown))!r}: it has {''.join(sorted(KEYS))}")
        os.write(self._master, keys.encode("ascii"))

    def close(self) -> None:
        for fd in (self._slave, self._master):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
