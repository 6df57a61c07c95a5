"""The day's downloads that exist, shared by the settlement page and the reports page (one list, so no link leads
to a 404)."""

from __future__ import annotations

from sqlalchemy import Connection, func, select

from backoffice import clearing_runs
from backoffice.web.api import reports
from clearing.runs import NO_FLEET

CSV_LABELS = {"route": ("线路", "routes"), "vehicle": ("车辆", "vehicles"), "driver": ("司机", "drivers"),
              "card_type": ("卡类", "card types"), "fleet": ("车队", "fleets"),
              "adjustments": ("更正（迟到刷卡、对账调整）", "adjustments (late taps, reconciliation)"),
              "tickets_by_route": ("电子票按线路", "tickets by route"),
              "tickets_by_vehicle": ("电子票按车辆", "tickets by vehicle"),
              "tickets_by_driver": ("电子票按司机", "tickets by driver"),
              "tickets_by_product": ("电子票按票种", "tickets by product"),
              "tickets_by_channel": ("电子票按渠道", "tickets by channel"),
              "tickets_by_source": ("电子票按来源", "tickets by source"),
              "tickets_late": ("电子票以前运营日确认", "tickets recognised for earlier days"),
              "ticket_sales": ("售票", "ticket sales"),
              "ticket_outstanding": ("未使用票款（递延）", "tickets outstanding (deferred)")}


def _sells_tickets(conn: Connection | None, run: clearing_runs.StoredRun) -> bool:
    """Whether the day's reports carry the ticket section (backoffice.settle.ticket_tables): the run recognised
    ticket revenue, or the operator had sold a ticket by the run's moment."""
    if run.rows["section"].isin(("ticket", "ticket_late")).any():
        return True
    if conn is None:
        return False
    from backoffice.models import Ticket

    return bool(conn.execute(select(func.count()).select_from(Ticket).where(
        Ticket.operator == run.operator, Ticket.issued_at < run.as_of)).scalar())


def day_csv_tables(run: clearing_runs.StoredRun | None, conn: Connection | None = None) -> list[str]:
    """The day's CSV tables that exist, so that no link leads to a 404: route, vehicle, driver (and card type)
    always; fleet when a vehicle is in a fleet; adjustments when the run carries late taps or reconciliation
    adjustments (the link that used to 404 on every day without them); the ticket tables when the day is cleared
    and the operator sells e-tickets (``tickets_late`` only when the run recognised revenue of earlier days).
    Without ``conn`` the ticket tables are listed only when the run recognised ticket revenue."""
    names = ["route", "vehicle", "driver"] + [t for t in ("card_type",) if t in reports.TABLES]
    if run is not None:
        if any(run.table("fleet")["fleet"].astype(str) != NO_FLEET):
            names.append("fleet")
        if run.rows["section"].isin(("late", "reconciliation")).any():  # not the ticket sections
            names.append("adjustments")
        if _sells_tickets(conn, run):
            late = run.rows["section"].eq("ticket_late").any()
            names += [t for t in reports.TICKET_TABLES if t != "tickets_late" or late]
    return names
