"""The ticket jobs a scheduler runs every minute or so: unpaid orders past their hold deadline expire and give their
seats back; tickets past their validity with rides left expire and their orders settle. Each step commits on its
own, so a failure in one leaves the other's work done; running twice (two back-office processes) does nothing twice
(every change is a conditional UPDATE, backoffice.tickets.orders)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from backoffice.tickets import orders

log = logging.getLogger(__name__)
EVERY_SECONDS = 60


@dataclass(frozen=True)
class ExpiryDone:
    orders_expired: list[str]
    tickets_expired: int


def expire_due(engine: Engine, *, now: datetime | None = None) -> ExpiryDone:
    with engine.begin() as conn:
        expired = orders.expire_unpaid(conn, now=now)
    with engine.begin() as conn:
        tickets = orders.expire_tickets(conn, now=now)
    if expired or tickets:
        log.info("tickets: %d unpaid order(s) expired, seats released; %d ticket(s) past validity", len(expired),
                 tickets)
    return ExpiryDone(expired, tickets)
