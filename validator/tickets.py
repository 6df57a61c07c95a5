"""Cardless tickets on the bus: a QR code from the 2D scanner, or a pickup code typed on the driver's keypad,
checked offline and recorded as a ``ticket_use`` in the same journal (and so the same uplink) as card taps.

A QR ticket (wire.ticket) is checked, in this order, and refused with the rider's message at the first failure:

1. it decodes and its Ed25519 signature verifies with one of the ticket public keys in the bus's parameters
   (``Terminal.ticket_params``, from the signed params package): "invalid ticket" (forged or altered) or "ticket
   not recognised" (not a ticket, too long, a key this bus does not hold);
2. it is this bus's operator's; it is not on the deny list (the bus's deny list, under ``wire.ticket.deny_key``,
   or the ``denied`` ids of the ticket parameters);
3. now is within its validity (half-open: from <= now < to): "not valid yet" / "expired";
4. it covers this bus's route (no routes = any route);
5. a driver is signed in (as for cards: a use belongs to a shift);
6. uses: the journal's used-ticket table counts this ticket's uses here, in the same transaction as the record,
   so a single ride is accepted once, a ticket of N uses N times, and an unlimited pass (uses 0) any number of
   times within validity. The same ticket again within the double-tap window is "already paid" and not counted
   (a rider holding the phone to the scanner twice).

A pickup code (16 digits, wire.ticket) is checked with the operator's pickup key from the same parameters. The bus
does not know the ticket behind it (the back office maps serial to ticket), so it is accepted once per serial on
this bus (a QR ticket and its pickup code share the serial, so one cannot be used after the other here). Wrong
codes are counted; after ``max_wrong_codes`` in a row the keypad refuses codes for ``lockout_seconds``. The count
and the lockout are kept in the journal, so turning the validator off and on does not reset them.

What the bus cannot see (the same ticket on another, offline bus) is the back office's to catch at ingest.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from datetime import datetime, timedelta

from validator.journal import JournalError, JournalFull
from validator.messages import Outcome
from validator.terminal import TapResult
from wire import ticket as wt
from wire.records import PRESENTED_PICKUP, PRESENTED_QR, RecordKind, TapRecord

log = logging.getLogger(__name__)

MAX_WRONG_CODES = 5
LOCKOUT_SECONDS = 300
_LOCK_STATE = "pickup_lockout"

_OUTCOME_OF_ERROR = {
    wt.BAD_SIGNATURE: Outcome.TICKET_FORGED,
    wt.GARBAGE: Outcome.TICKET_UNREADABLE,
    wt.TOO_LONG: Outcome.TICKET_UNREADABLE,
    wt.BAD_VERSION: Outcome.TICKET_UNREADABLE,
    wt.UNKNOWN_KEY: Outcome.TICKET_UNREADABLE,
}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The offline check of a QR ticket, before anything is written: the ticket (when it decoded) and the
    outcome if it is refused (None: it may be used, subject to the shift and the used-ticket table)."""

    ticket: wt.Ticket | None
    refused: Outcome | None
    detail: str = ""


class TicketChecker:
    def __init__(self, terminal, *, max_wrong_codes: int = MAX_WRONG_CODES, lockout_seconds: int = LOCKOUT_SECONDS):
        if max_wrong_codes < 1 or lockout_seconds < 1:
            raise ValueError("max_wrong_codes and lockout_seconds must be at least 1")
        self.terminal = terminal
        self.max_wrong_codes = max_wrong_codes
        self.lockout = timedelta(seconds=lockout_seconds)

    @property
    def params(self) -> wt.TicketParams:
        return self.terminal.ticket_params

    # -- QR ------------------------------------------------------------------------------------------------------

    def verify(self, text, now: datetime) -> Verdict:
        """Steps 1 to 4 of the module docstring: pure, nothing written (the bench times this)."""
        params, config = self.params, self.terminal.config
        try:
            ticket = wt.decode_ticket(text, params.public_keys)
        except wt.TicketError as e:
            return Verdict(None, _OUTCOME_OF_ERROR.get(e.reason_code, Outcome.TICKET_UNREADABLE),
                           f"{e.reason_code}: {e.message}")
        if ticket.operator != config.operator:
            return Verdict(ticket, Outcome.TICKET_WRONG_OPERATOR, f"ticket of {ticket.operator}")
        if params.is_denied(ticket.ticket_id) or wt.deny_key(ticket.ticket_id) in self.terminal.deny_list:
            return Verdict(ticket, Outcome.TICKET_BLOCKED, f"ticket {ticket.ticket_id} on the deny list")
        if now < ticket.valid_from:
            return Verdict(ticket, Outcome.TICKET_NOT_YET_VALID, f"valid from {ticket.valid_from.isoformat()}")
        if now >= ticket.valid_to:
            return Verdict(ticket, Outcome.TICKET_EXPIRED, f"valid until {ticket.valid_to.isoformat()}")
        if not ticket.covers_route(config.route):
            return Verdict(ticket, Outcome.TICKET_WRONG_ROUTE, f"routes {', '.join(ticket.routes)}")
        return Verdict(ticket, None)

    def scan(self, text) -> TapResult:
        """A code the scanner read: the rider's answer, with the ``ticket_use`` record when accepted."""
        try:
            return self._scan(text)
        except (JournalError, sqlite3.Error) as e:
            return self._out_of_service(e)

    def _scan(self, text) -> TapResult:
        now = self.terminal.clock()
        verdict = self.verify(text, now)
        if verdict.refused is not None:
            log.info("device %s: ticket refused (%s): %s", self.terminal.config.device_id, verdict.refused.value,
                     verdict.detail)
            return TapResult(verdict.refused, detail=verdict.detail)
        ticket = verdict.ticket
        if self.terminal.shift is None:
            return TapResult(Outcome.NO_SHIFT)
        serial = ticket.serial
        seen = self.terminal.journal.ticket_used(serial)
        if (seen is not None and (not ticket.uses or seen[0] < ticket.uses)
                and timedelta(0) <= now - seen[1] < timedelta(seconds=self.terminal.config.double_tap_seconds)):
            return TapResult(Outcome.ALREADY_PAID, detail=f"ticket {ticket.ticket_id} scanned again")
        record = self.terminal.journal.use_ticket(
            self._record(now, ticket.ticket_id, PRESENTED_QR, card_type=ticket.rider_category),
            serial=serial, max_uses=ticket.uses, valid_to=ticket.valid_to)
        if record is None:
            return TapResult(Outcome.TICKET_USED, detail=f"ticket {ticket.ticket_id}: {ticket.uses} use(s) had")
        return TapResult(Outcome.TICKET_OK, record=record,
                         detail=f"ticket {ticket.ticket_id} use {record.ticket_use}")

    # -- pickup code ---------------------------------------------------------------------------------------------

    def locked_until(self, now: datetime | None = None) -> datetime | None:
        """When the keypad takes pickup codes again, None if it does now."""
        state = self.terminal.journal.get_state(_LOCK_STATE) or {}
        until = state.get("until")
        now = now or self.terminal.clock()
        if until is None or int(now.timestamp()) >= until:
            return None
        return datetime.fromtimestamp(until, tz=now.tzinfo)

    def pickup(self, code: str) -> TapResult:
        """A pickup code the driver typed: the answer, with the ``ticket_use`` record when accepted."""
        try:
            return self._pickup(code)
        except (JournalError, sqlite3.Error) as e:
            return self._out_of_service(e)

    def _pickup(self, code: str) -> TapResult:
        now = self.terminal.clock()
        journal = self.terminal.journal
        until = self.locked_until(now)
        if until is not None:
            return TapResult(Outcome.CODE_LOCKED, detail=f"keypad locked until {until.isoformat()}")
        if not self.params.pickup_key:
            return TapResult(Outcome.TICKET_UNREADABLE, detail="no pickup key in this bus's parameters")
        try:
            serial = wt.check_pickup_code(code, self.params.pickup_key)
        except wt.TicketError as e:
            if e.reason_code == wt.MALFORMED_PICKUP:
                return TapResult(Outcome.CODE_WRONG, detail=e.message)  # a slip of the finger: not counted
            wrong = (journal.get_state(_LOCK_STATE) or {}).get("wrong", 0) + 1
            if wrong >= self.max_wrong_codes:
                until = now + self.lockout
                journal.put_state(_LOCK_STATE, {"wrong": 0, "until": int(until.timestamp())})
                log.warning("device %s: %d wrong pickup codes in a row; keypad locked until %s",
                            self.terminal.config.device_id, wrong, until.isoformat())
                return TapResult(Outcome.CODE_LOCKED, detail=f"{wrong} wrong codes; locked until {until.isoformat()}")
            journal.put_state(_LOCK_STATE, {"wrong": wrong})
            return TapResult(Outcome.CODE_WRONG, detail=f"{e.message} ({wrong} of {self.max_wrong_codes})")
        if journal.get_state(_LOCK_STATE):
            journal.put_state(_LOCK_STATE, None)  # a right code ends the run of wrong ones
        if self.params.serial_denied(serial) or wt.serial_deny_key(serial) in self.terminal.deny_list:
            return TapResult(Outcome.TICKET_BLOCKED, detail=f"serial {serial} on the deny list")
        if self.terminal.shift is None:
            return TapResult(Outcome.NO_SHIFT)
        record = journal.use_ticket(self._record(now, serial, PRESENTED_PICKUP), serial=serial, max_uses=1)
        if record is None:
            return TapResult(Outcome.TICKET_USED, detail=f"pickup code of serial {serial:010d} used here already")
        return TapResult(Outcome.TICKET_OK, record=record, detail=f"pickup serial {serial:010d}")

    # -- common --------------------------------------------------------------------------------------------------

    def _record(self, now: datetime, ticket_id: int, presented: str, **fields) -> TapRecord:
        config, shift = self.terminal.config, self.terminal.shift or {}
        return TapRecord(device_id=config.device_id, device_seq=0, kind=RecordKind.TICKET_USE, occurred_at=now,
                         operator=config.operator, route=config.route, vehicle=config.vehicle,
                         driver=shift.get("driver", ""), shift_no=shift.get("shift_no", 0), ticket_id=ticket_id,
                         ticket_use=1, presented=presented, **fields)

    def _out_of_service(self, e: Exception) -> TapResult:
        if isinstance(e, JournalFull):
            log.error("device %s: %s", self.terminal.config.device_id, e)
        else:
            log.error("device %s cannot write its journal (%s): accepting no tickets", self.terminal.config.device_id,
                      e)
        return TapResult(Outcome.OUT_OF_SERVICE, detail=f"journal: {e}")
