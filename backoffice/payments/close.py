"""The day's payments close: sales, refunds and the platform's fees, by channel, out of the books (one place computes
them; reports.payments_close only lays them out).

The day is the platform's (local midnight to midnight in ``tz``, as it cuts its statement). Sales: the payments
farebox recorded that day (ticket orders' ``paid_fen`` by channel, over-the-air top-ups' ``amount``); refunds: the
refunds the platform answered that day (``payment_refund``, state succeeded); fees: the day's stored statement
(its newest version), per payment line, put on the channel of the order it names ("unknown" when farebox has no
such order: a work-list item says so). The tie-out puts the statement's own sums beside the books'.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import pandas as pd
from sqlalchemy import Connection, func, select

from backoffice.cards.payments_recon import DEFAULT_TZ, day_bounds
from backoffice.models import PaymentReconItem, TicketOrder, TopupOrder
from backoffice.payments.tables import refund as R, statement as S, statement_line as L

CHANNELS = ("web", "sms", "partner", "counter", "topup", "unknown")
CLOSE_COLUMNS = ("channel", "payments", "sales", "refunds_count", "refunds", "fees", "net")


@dataclass(frozen=True)
class PaymentsClose:
    day: date
    tz: str
    by_channel: pd.DataFrame  # CLOSE_COLUMNS, money in fen; rows with nothing are left out
    statement_id: int | None  # the statement the fees come from (None: not fetched yet)
    statement_sales: int | None  # fen, the statement's payment lines
    statement_refunds: int | None
    open_items: int  # the day's work-list items still open

    def total(self, column: str) -> int:
        return int(self.by_channel[column].sum()) if len(self.by_channel) else 0


def close_figures(conn: Connection, *, day: date, tz: str = DEFAULT_TZ) -> PaymentsClose:
    start, end = day_bounds(day, tz)
    rows = {c: dict.fromkeys(CLOSE_COLUMNS[1:], 0) for c in CHANNELS}
    for r in conn.execute(select(TicketOrder.channel, func.count(), func.sum(TicketOrder.paid_fen)).where(
            TicketOrder.payment_ref.is_not(None), TicketOrder.paid_at >= start, TicketOrder.paid_at < end)
            .group_by(TicketOrder.channel)):
        rows[r[0] if r[0] in rows else "unknown"].update(payments=int(r[1]), sales=int(r[2] or 0))
    n, fen = conn.execute(select(func.count(), func.sum(TopupOrder.amount)).where(
        TopupOrder.payment_ref.is_not(None), TopupOrder.paid_at >= start, TopupOrder.paid_at < end)).one()
    rows["topup"].update(payments=int(n), sales=int(fen or 0))
    channel_of = select(TicketOrder.channel).where(TicketOrder.order_id == R.c.order_id).scalar_subquery()
    for r in conn.execute(select(R.c.order_kind, channel_of, func.count(), func.sum(R.c.amount)).where(
            R.c.state == "succeeded", R.c.answered_at >= start, R.c.answered_at < end)
            .group_by(R.c.order_kind, channel_of)):
        key = "topup" if r[0] == "topup" else (r[1] if r[1] in rows else "unknown")
        rows[key]["refunds_count"] += int(r[2])
        rows[key]["refunds"] += int(r[3] or 0)
    statement_id = conn.execute(select(func.max(S.c.id)).where(S.c.day == day)).scalar()
    st_sales = st_refunds = None
    if statement_id is not None:
        ticket_channel = select(TicketOrder.channel).where(TicketOrder.order_id == L.c.order_id).scalar_subquery()
        is_topup = select(func.count()).where(TopupOrder.order_id == L.c.order_id).scalar_subquery()
        for r in conn.execute(select(ticket_channel, is_topup, func.sum(L.c.fee)).where(
                L.c.statement_id == statement_id, L.c.kind == "payment").group_by(ticket_channel, is_topup)):
            key = r[0] if r[0] in rows else ("topup" if r[1] else "unknown")
            rows[key]["fees"] += int(r[2] or 0)
        sums = dict(conn.execute(select(L.c.kind, func.sum(L.c.amount)).where(L.c.statement_id == statement_id)
                                 .group_by(L.c.kind)).all())
        st_sales, st_refunds = int(sums.get("payment") or 0), int(sums.get("refund") or 0)
    for v in rows.values():
        v["net"] = v["sales"] - v["refunds"] - v["fees"]
    frame = pd.DataFrame([{"channel": c, **v} for c, v in rows.items() if any(v[k] for k in
                                                                              ("payments", "refunds_count", "fees"))],
                         columns=list(CLOSE_COLUMNS))
    open_items = conn.execute(select(func.count()).select_from(PaymentReconItem).where(
        PaymentReconItem.day == day, PaymentReconItem.status.in_(("open", "disputed")))).scalar_one()
    return PaymentsClose(day, tz, frame, statement_id, st_sales, st_refunds, int(open_items))
