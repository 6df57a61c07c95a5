"""Fares the back office sends as parameters. This first table is flat per route, the same for every card type;
discounts, segments and transfers extend it without changing how the terminal asks."""

from __future__ import annotations

import dataclasses


class FareError(LookupError):
    pass


@dataclasses.dataclass(frozen=True)
class FareTable:
    version: int
    flat: dict[str, int]  # route code -> fare in fen

    def fare(self, route: str, card_type: int) -> int:
        try:
            return self.flat[route]
        except KeyError:
            raise FareError(f"fare table v{self.version} has no fare for route {route!r}: "
                            "push a fare table that includes it") from None
