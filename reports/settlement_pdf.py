"""The daily settlement PDF written straight from a ``clearing.settlement.Settlement``: the entry point
``backoffice/settle.py`` and the demo use. It is the daily report of ``reports.daily`` (page headers with the
operator, the day, the clearing run and "Page i of n"; revenue by route as a chart; by route, by vehicle and by
driver with bold totals; Chinese names in an embedded CJK font, see ``reports.pdf``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd

from clearing.service_day import DEFAULT_CUTOFF_HOUR
from clearing.settlement import Settlement
from reports.daily import write_daily_pdf
from reports.pdf import check_aware, yuan  # noqa: F401 - yuan is part of this module's API
from reports.settlement_doc import ClearingRun, SettlementTables


def write_settlement_pdf(
    settlement: Settlement,
    path: str | Path,
    *,
    operator_name: str,
    generated_at: datetime,
    route_names: dict[str, str] | None = None,
    vehicle_names: dict | None = None,
    driver_names: dict | None = None,
    run_id: str | None = None,
    run_at: datetime | None = None,
    taps_by_hour: pd.DataFrame | None = None,
    cutoff_hour: int = DEFAULT_CUTOFF_HOUR,
    tz: str | None = None,
    card_type_names: dict[int, str] | None = None,
) -> Path:
    """Write the settlement report to `path` (atomically: readers see the old file or the whole new one).

    `run_id` / `run_at` name the stored clearing run the settlement came from; without them the pages say the
    clearing was ad hoc, at `generated_at`. `taps_by_hour` (columns hour, local 0-23, and taps) adds the
    taps-by-hour chart, its hours in service-day order from `cutoff_hour`. `tz` (the operator's zone) prints
    times in it, named (else UTC); the settlement's card types come as their own table, named by
    `card_type_names` where given."""
    check_aware("generated_at", generated_at)
    check_aware("run_at", run_at)
    names = {k: v for k, v in (("route", route_names), ("vehicle", vehicle_names), ("driver", driver_names))
             if v is not None}
    if card_type_names is not None:
        names["card_type"] = card_type_names
    by_card_type = settlement.by_card_type  # taps, amount (gross): as the other tables of a Settlement
    by_card_type = by_card_type.astype({"card_type": "int64"}) if len(by_card_type) else None
    tables = SettlementTables(
        operator=settlement.operator,
        operator_name=operator_name,
        first_day=settlement.day,
        last_day=settlement.day,
        by_route=settlement.by_route,
        by_vehicle=settlement.by_vehicle,
        by_driver=settlement.by_driver,
        run=ClearingRun(run_id, run_at or generated_at) if run_id is not None else None,
        generated_at=generated_at,
        names=names,
        taps_by_hour=taps_by_hour,
        by_card_type=by_card_type,
        tz=tz,
    )
    return write_daily_pdf(tables, path, cutoff_hour=cutoff_hour)
