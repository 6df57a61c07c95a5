"""Settlement of one service day for one operator: fare revenue by route, vehicle, driver and card type.

Works on a frame of taps handed in (one row per validator record, as ingested) and knows nothing of where they
came from. Only purchases are revenue; shift records and refused cards are in the same stream and are left out.
Money stays int fen (int64) from input to every total. The sums by key are ``clearing.runs.revenue_by``'s, the
same a clearing run stores: this module gives the figures of a day that has no run yet (provisional).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import pandas as pd

from clearing.runs import revenue_by
from clearing.service_day import DEFAULT_CUTOFF_HOUR, DEFAULT_TZ, service_day

TAP_COLUMNS = (
    "device_id",
    "device_seq",
    "kind",
    "occurred_at",
    "operator",
    "route",
    "vehicle",
    "driver",
    "card_type",
    "amount",
)
PURCHASE = "purchase"
_DEDUPE_KEY = ["device_id", "device_seq"]  # and "epoch" (the validator journal) when the frame has it


def _empty_table(key: str) -> pd.DataFrame:
    key_dtype = "int64" if key == "card_type" else "str"
    return pd.DataFrame(
        {
            key: pd.Series([], dtype=key_dtype),
            "taps": pd.Series([], dtype="int64"),
            "amount": pd.Series([], dtype="int64"),
        }
    )


@dataclass(frozen=True, eq=False)  # eq=False: comparing frames field by field has no single truth value
class Settlement:
    operator: str
    day: date
    by_route: pd.DataFrame
    by_vehicle: pd.DataFrame
    by_driver: pd.DataFrame
    taps: int  # number of purchases
    amount: int  # fen
    by_card_type: pd.DataFrame = field(default_factory=lambda: _empty_table("card_type"))

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every breakdown by its key column name."""
        return {
            "route": self.by_route,
            "vehicle": self.by_vehicle,
            "driver": self.by_driver,
            "card_type": self.by_card_type,
        }

    def totals_agree(self) -> bool:
        """True when every breakdown adds up to the day's taps and amount (each purchase counted once in each)."""
        return all(
            int(table["taps"].sum()) == self.taps and int(table["amount"].sum()) == self.amount
            for table in self.tables().values()
        )


def _check_columns(taps: pd.DataFrame) -> None:
    missing = [c for c in TAP_COLUMNS if c not in taps.columns]
    if missing:
        raise ValueError(f"tap frame is missing column(s) {missing}; settle_day needs {list(TAP_COLUMNS)}")


def _fen(amount: pd.Series) -> pd.Series:
    """The amounts as int64 fen, refusing floats: a float amount means money was already rounded somewhere."""
    if pd.api.types.is_bool_dtype(amount) or pd.api.types.is_float_dtype(amount):
        raise TypeError(f"amount must be integer fen, got dtype {amount.dtype}")
    if pd.api.types.is_integer_dtype(amount):
        if amount.isna().any():  # nullable Int64 with missing values
            raise ValueError("amount has missing values; every purchase needs its fare in fen")
        return amount.astype("int64")
    bad = [v for v in amount if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise TypeError(f"amount must be integer fen, found {bad[:3]!r}")
    return amount.astype("int64")


def _drop_replays(rows: pd.DataFrame) -> pd.DataFrame:
    """Drop exact repeats of a record; refuse two different records under one (device_id, [epoch,] device_seq).

    Ingest already dedupes by that key, so repeats should not reach here; if they do, counting them twice would
    overstate revenue, and a conflicting pair is a fault to look at, not to settle silently. A validator whose
    journal was replaced numbers from 1 again under a new epoch: with an ``epoch`` column those are other keys.
    """
    key = _DEDUPE_KEY + ["epoch"] if "epoch" in rows.columns else _DEDUPE_KEY
    rows = rows.drop_duplicates(subset=list(dict.fromkeys([*TAP_COLUMNS, *key])))
    clash = rows.duplicated(subset=key, keep=False)
    if clash.any():
        keys = rows.loc[clash, key].drop_duplicates().head(3).to_records(index=False).tolist()
        raise ValueError(f"different records share a ({', '.join(key)}) key, e.g. {keys}; check ingest")
    return rows


def _breakdown(purchases: pd.DataFrame, key: str) -> pd.DataFrame:
    """Taps and amount by ``key``, summed by ``clearing.runs.revenue_by`` (the sums a clearing run stores), so a
    provisional day and its run can only differ by the taps they were given. A missing key counts under ""."""
    if purchases.empty:
        return _empty_table(key)
    table = revenue_by(purchases, key).rename(columns={"gross": "amount"})
    if key == "card_type":  # a number on the card: back to int, in numeric order
        table = table.astype({key: "int64"}).sort_values(key, kind="stable").reset_index(drop=True)
    return table[[key, "taps", "amount"]]


def settle_day(
    taps: pd.DataFrame,
    day: date,
    *,
    operator: str,
    tz: str = DEFAULT_TZ,
    cutoff_hour: int = DEFAULT_CUTOFF_HOUR,
) -> Settlement:
    """Settle `operator`'s purchases on service `day` (local to `tz`, starting at `cutoff_hour`)."""
    _check_columns(taps)
    mine = taps[(taps["operator"] == operator) & (taps["kind"] == PURCHASE)]
    if not mine.empty:
        mine = mine[service_day(mine["occurred_at"], tz=tz, cutoff_hour=cutoff_hour) == day]
    purchases = _drop_replays(mine.loc[:, list(TAP_COLUMNS) + (["epoch"] if "epoch" in mine.columns else [])])
    purchases = purchases.assign(amount=_fen(purchases["amount"]))
    if not purchases.empty:
        purchases = purchases.assign(card_type=purchases["card_type"].astype("int64"))
    return Settlement(
        operator=operator,
        day=day,
        by_route=_breakdown(purchases, "route"),
        by_vehicle=_breakdown(purchases, "vehicle"),
        by_driver=_breakdown(purchases, "driver"),
        by_card_type=_breakdown(purchases, "card_type"),
        taps=len(purchases),
        amount=int(purchases["amount"].sum()),
    )
