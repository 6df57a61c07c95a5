"""The tap state machine: one card in the field, one decision, one record on disk.

A driver card opens or closes the driver's shift. A rider card pays the route's fare, crash-safe: the pending
("grey") record is on disk before the DEBIT reaches the card, the completed one (with the card's TAC) before the
rider is told "paid"; a card pulled away in between leaves the grey record, which GET TRANSACTION PROVE settles when
that card is seen again. A card on the deny list is refused and the refusal recorded. Nothing here knows which
reader or which link is underneath.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

from blacklist.denylist import DenyList
from epurse import apdu
from epurse.cardtypes import CardType
from epurse.crypto import bcd_date, bcd_time
from validator.fares import FareError, FareTable
from validator.journal import Journal, JournalError
from validator.messages import Outcome
from validator.readers.base import CardRemoved, CardSession, ReaderError
from wire.records import RecordKind, TapRecord

log = logging.getLogger(__name__)

PURCHASE_KEY_INDEX = 0x01


@dataclasses.dataclass(frozen=True)
class TerminalConfig:
    device_id: str
    operator: str
    route: str
    vehicle: str
    double_tap_seconds: int = 30  # the same card again within this window is "already paid", not charged twice
    tz: str = "Asia/Shanghai"  # where the bus runs: a card's validity dates are local calendar days


@dataclasses.dataclass(frozen=True)
class TapResult:
    outcome: Outcome
    fare: int | None = None
    balance: int | None = None
    record: TapRecord | None = None
    detail: str = ""  # for the log and the maintenance screen, not for the rider


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Terminal:
    def __init__(self, config: TerminalConfig, *, journal: Journal, psam: CardSession, fares: FareTable,
                 deny_list: DenyList | None = None, clock: Callable[[], datetime] = _now):
        self.config = config
        self.journal = journal
        self.psam = psam
        self.fares = fares
        self.deny_list = deny_list or DenyList.empty()
        self.clock = clock
        self.terminal_id = apdu.check(psam.exchange(apdu.psam_read_terminal_id()), "PSAM READ TERMINAL ID")
        self._last_paid: dict[str, datetime] = {}
        self._zone = ZoneInfo(config.tz)
        # This terminal is the journal's only writer, so the open shift is read once here and kept in step with
        # every write below, instead of being read back from disk on each tap.
        self._shift: dict | None = journal.get_state("shift")

    @property
    def shift(self) -> dict | None:
        """The open driver shift: driver (staff number), shift_no, opened_at; None when signed out."""
        return self._shift

    def tap(self, card: CardSession) -> TapResult:
        try:
            return self._tap(card)
        except CardRemoved as e:
            return TapResult(Outcome.TAP_AGAIN, detail=f"card left the field: {e}")
        except ReaderError as e:
            return TapResult(Outcome.TAP_AGAIN, detail=f"reader: {e}")
        except FareError as e:
            log.error("device %s takes no fares: %s", self.config.device_id, e)
            return TapResult(Outcome.OUT_OF_SERVICE, detail=str(e))
        except (JournalError, sqlite3.Error) as e:
            # No fare without a record on disk. A debit already sent stays as a grey record (if that write made
            # it) and is settled when the card comes back.
            log.error("device %s cannot write its journal (%s): taking no fares; free disk space or replace the "
                      "storage, nothing unsent is deleted", self.config.device_id, e)
            return TapResult(Outcome.OUT_OF_SERVICE, detail=f"journal: {e}")
        except (apdu.StatusError, apdu.ResponseError, ValueError) as e:
            log.warning("card refused on %s: %s", self.config.device_id, e)
            return TapResult(Outcome.CARD_UNREADABLE, detail=str(e))

    def _tap(self, card: CardSession) -> TapResult:
        now = self.clock()
        try:
            apdu.check(card.exchange(apdu.select_aid()), "SELECT")
        except apdu.StatusError as e:
            if e.sw == apdu.SW_APP_BLOCKED:
                return TapResult(Outcome.CARD_BLOCKED, detail="application blocked on the card")
            raise
        info = apdu.parse_public_info(apdu.check(card.exchange(apdu.read_public_info()), "READ BINARY 0015"))
        asn = info.asn.hex()
        for grey in self.journal.pending():
            if grey.card_asn == asn:
                settled = self._settle_grey(card, grey, now)
                if settled is not None:
                    return settled
        if asn in self.deny_list:
            record = self.journal.append(self._record(RecordKind.DENIED, now, card_asn=asn,
                                                      card_type=info.card_type, reason="on deny list"))
            return TapResult(Outcome.CARD_BLOCKED, record=record, detail="card is on the deny list")
        if not info.start <= self._local_date(now) <= info.end:
            return TapResult(Outcome.CARD_EXPIRED, detail=f"valid {info.start} to {info.end}")
        if info.card_type == CardType.DRIVER:
            holder = apdu.parse_holder_info(apdu.check(card.exchange(apdu.read_holder_info()), "READ BINARY 0016"))
            return self._driver_card(holder.staff_no, asn, now)
        if self.shift is None:
            return TapResult(Outcome.NO_SHIFT)
        last = self._last_paid.get(asn)
        if last is not None and (now - last).total_seconds() < self.config.double_tap_seconds:
            return TapResult(Outcome.ALREADY_PAID)
        return self._purchase(card, info, now)

    def _settle_grey(self, card: CardSession, grey: TapRecord, now: datetime) -> TapResult | None:
        """The card left mid-purchase last time: ask it whether that debit happened (GET TRANSACTION PROVE), and
        complete or cancel the grey record accordingly; never guess, never charge twice. Returns the answer for this
        tap when it was the rider's retry of that purchase, None when the tap goes on as a new one."""
        try:
            prove = apdu.parse_transaction_prove(apdu.check(
                card.exchange(apdu.get_transaction_prove(apdu.TX_PURCHASE, grey.card_ttc)), "GET TRANSACTION PROVE"))
        except apdu.StatusError as e:
            if e.sw != apdu.SW_PROVE_NOT_AVAILABLE:
                raise
            self.journal.cancel(grey.device_seq)  # the card never debited
            log.info("device %s seq %d: card %s was not debited; grey record cancelled", self.config.device_id,
                     grey.device_seq, grey.card_asn)
            return None
        record = dataclasses.replace(grey, tac=prove.tac.hex())
        self.journal.complete_purchase(record)
        log.info("device %s seq %d: card %s was debited; grey record completed with its TAC", self.config.device_id,
                 grey.device_seq, grey.card_asn)
        if (now - grey.occurred_at).total_seconds() >= self.config.double_tap_seconds:
            return None  # settled an old trip; this tap is a new one
        self._last_paid[grey.card_asn] = grey.occurred_at
        return TapResult(Outcome.PAID, fare=grey.amount, balance=grey.balance_after, record=record)

    def _local_date(self, now: datetime) -> date:
        return now.astimezone(self._zone).date()

    def _driver_card(self, staff_no: str, asn: str, now: datetime) -> TapResult:
        shift = self.shift
        if shift is not None and shift["driver"] == staff_no:
            record = self._append_shift(self._record(RecordKind.SHIFT_CLOSE, now, card_asn=asn,
                                                     card_type=CardType.DRIVER), None)
            return TapResult(Outcome.SHIFT_CLOSED, record=record)
        if shift is not None:
            # Hand-over without sign-out: the old shift ends where the new driver's begins.
            self._append_shift(self._record(RecordKind.SHIFT_CLOSE, now, reason=f"handed over to {staff_no}"), None)
        last_no = (self.journal.get_state("last_shift") or {}).get("shift_no", 0)
        new = {"driver": staff_no, "shift_no": last_no + 1, "opened_at": int(now.timestamp())}
        record = self._append_shift(
            self._record(RecordKind.SHIFT_OPEN, now, driver=staff_no, shift_no=new["shift_no"], card_asn=asn,
                         card_type=CardType.DRIVER), new, last_shift=new)
        return TapResult(Outcome.SHIFT_OPENED, record=record)

    def _append_shift(self, record: TapRecord, shift: dict | None, **more_state) -> TapRecord:
        """A shift record and the shift it leaves open, in one journal transaction; the cache follows the disk."""
        record = self.journal.append(record, state={"shift": shift, **more_state})
        self._shift = shift
        return record

    def _record(self, kind: RecordKind, now: datetime, **fields) -> TapRecord:
        shift = self.shift or {}
        base = {"device_id": self.config.device_id, "device_seq": 0, "kind": kind, "occurred_at": now,
                    "operator": self.config.operator, "route": self.config.route, "vehicle": self.config.vehicle,
                    "driver": shift.get("driver", ""), "shift_no": shift.get("shift_no", 0)}
        base.update(fields)
        return TapRecord(**base)

    def _purchase(self, card: CardSession, info: apdu.PublicInfo, now: datetime) -> TapResult:
        fare = self.fares.fare(self.config.route, info.card_type)
        try:
            init = apdu.parse_init_purchase(apdu.check(
                card.exchange(apdu.init_purchase(PURCHASE_KEY_INDEX, fare, self.terminal_id)),
                "INITIALIZE FOR PURCHASE"))
        except apdu.StatusError as e:
            if e.sw == apdu.SW_INSUFFICIENT_FUNDS:
                return TapResult(Outcome.INSUFFICIENT_BALANCE, fare=fare, detail=str(e))
            raise
        sam = apdu.parse_psam_init_purchase(apdu.check(self.psam.exchange(apdu.psam_init_purchase(
            init.random, init.ttc, fare, apdu.TX_PURCHASE, now, init.key_version, init.algorithm, info.asn[-8:],
            info.issuer)), "PSAM INIT FOR PURCHASE"))
        record = self.journal.begin_purchase(self._record(
            RecordKind.PURCHASE, now, card_asn=info.asn.hex(), card_type=info.card_type, card_ttc=init.ttc,
            amount=fare, balance_after=init.balance - fare, terminal_id=self.terminal_id.hex(),
            terminal_seq=sam.terminal_seq))
        try:
            debit = apdu.parse_debit(apdu.check(card.exchange(
                apdu.debit_purchase(sam.terminal_seq, bcd_date(now), bcd_time(now), sam.mac1)),
                "DEBIT FOR PURCHASE"))
        except (ReaderError, apdu.ResponseError):
            # We cannot know whether the card debited: the grey record stays until the card is seen again.
            raise
        except apdu.StatusError:
            self.journal.cancel(record.device_seq)  # the card said no: nothing was taken
            raise
        reason = ""
        try:
            apdu.check(self.psam.exchange(apdu.psam_verify_mac2(debit.mac2)), "PSAM VERIFY MAC2")
        except apdu.StatusError as e:
            # The card debited (it gave a TAC) but its MAC2 is wrong: keep the record, flag it for the back office.
            reason = f"MAC2 did not verify: {e}"
            log.error("device %s seq %d: %s", self.config.device_id, record.device_seq, reason)
        record = dataclasses.replace(record, tac=debit.tac.hex(), reason=reason)
        self.journal.complete_purchase(record)
        self._last_paid[record.card_asn] = now
        return TapResult(Outcome.PAID, fare=fare, balance=record.balance_after, record=record)
