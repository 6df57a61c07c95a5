"""Card types, as written in byte 0 of the issuer data at the end of the public information file (0015).

The value decides the fare class (adult, student, elderly, staff) or that the card opens a driver's shift.
"""

from __future__ import annotations

from enum import IntEnum


class CardType(IntEnum):
    ADULT = 1
    STUDENT = 2
    ELDERLY = 3
    STAFF = 4
    DRIVER = 5

    @property
    def label(self) -> str:
        """The English name a rider or clerk sees, e.g. "student card"."""
        return _LABELS[self][0]

    @property
    def label_zh(self) -> str:
        """The Chinese name printed on the card and on the validator, e.g. 学生卡."""
        return _LABELS[self][1]


_LABELS = {
    CardType.ADULT: ("adult card", "普通卡"),
    CardType.STUDENT: ("student card", "学生卡"),
    CardType.ELDERLY: ("elderly card", "老人卡"),
    CardType.STAFF: ("staff card", "员工卡"),
    CardType.DRIVER: ("driver card", "司机卡"),
}
