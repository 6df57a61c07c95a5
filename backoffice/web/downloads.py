"""The day's downloads that exist, shared by the settlement page and the reports page (one list, so no link leads
to a 404)."""

from __future__ import annotations

from backoffice import clearing_runs
from backoffice.web.api import reports
from clearing.runs import NO_FLEET

CSV_LABELS = {"route": ("线路", "routes"), "vehicle": ("车辆", "vehicles"), "driver": ("司机", "drivers"),
              "card_type": ("卡类", "card types"), "fleet": ("车队", "fleets"),
              "adjustments": ("更正（迟到刷卡、对账调整）", "adjustments (late taps, reconciliation)")}


def day_csv_tables(run: clearing_runs.StoredRun | None) -> list[str]:
    """The day's CSV tables that exist, so that no link leads to a 404: route, vehicle, driver (and card type)
    always; fleet when a vehicle is in a fleet; adjustments when the run carries late taps or reconciliation
    adjustments (the link that used to 404 on every day without them)."""
    names = ["route", "vehicle", "driver"] + [t for t in ("card_type",) if t in reports.TABLES]
    if run is not None:
        if any(run.table("fleet")["fleet"].astype(str) != NO_FLEET):
            names.append("fleet")
        if run.rows["section"].isin(("late", "reconciliation")).any():  # not the ticket sections
            names.append("adjustments")
    return names
