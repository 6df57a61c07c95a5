"""The tap state machine: one card in the field, one decision, one record on disk.

A driver card opens or closes the driver's shift. A rider card pays what the fare table says (validator.fares),
always as a composite purchase: INITIALIZE FOR PURCHASE (P1 03), UPDATE CAPP DATA CACHE with the new transit record
(epurse.transit), DEBIT FOR PURCHASE, so the card's record of where it boarded changes with its balance or not at
all. Crash-safe: the pending ("grey") record is on disk before the DEBIT reaches the card, the completed one (with
the card's TAC) before the rider is told "paid"; a card pulled away in between leaves the grey record, which GET
TRANSACTION PROVE settles when that card is seen again. A card on the deny list is locked on the spot (APPLICATION
BLOCK with a MAC from the PSAM) and the event recorded. Nothing here knows which reader or which link is underneath.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from blacklist.denylist import DenyList
from epurse import apdu
from epurse.cardtypes import CardType
from epurse.crypto import bcd_date, bcd_time
from epurse.transit import TransitRecord, TransitRecordError, TripState
from validator.fares import FareError, FareTable, Quote, Step, quote
from validator.journal import Journal, JournalError, JournalFull
from validator.messages import Outcome
from validator.readers.base import CardRemoved, CardSession, CommunicationError, ReaderError
from validator.shift_report import ShiftReport
from wire.codec import MAX_ID
from wire.records import RecordKind, TapRecord
from wire.ticket import TicketParams

log = logging.getLogger(__name__)

PURCHASE_KEY_INDEX = 0x01


@dataclasses.dataclass(frozen=True)
class TerminalConfig:
    device_id: str
    operator: str
    route: str
    vehicle: str
    # The same card on this validator again within this window is "already paid", not charged twice. The card's
    # own transit record says when it last paid here, so the window survives a restart and costs no memory.
    double_tap_seconds: int = 30
    tz: str = "Asia/Shanghai"  # where the bus runs: a card's validity dates are local calendar days

    def __post_init__(self):
        # Every record carries both, and a batch with a longer one cannot be sent: refuse at start, not at upload.
        for name in ("device_id", "operator"):
            value = getattr(self, name)
            if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID:
                raise ValueError(f"{name} {value!r} must be 1 to {MAX_ID} characters (the wire carries no more): "
                                 "fix the validator's configuration")


@dataclasses.dataclass(frozen=True)
class TapResult:
    outcome: Outcome
    fare: int | None = None
    balance: int | None = None
    record: TapRecord | None = None
    detail: str = ""  # for the log and the maintenance screen, not for the rider
    report: ShiftReport | None = None  # the closed shift's totals, when a driver signed out or handed over


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
        self.stop = 0  # the stop the bus is at (GPS or the driver's stop button), for distance fares
        self._zone = ZoneInfo(config.tz)
        # This terminal is the journal's only writer, so the open shift is read once here and kept in step with
        # every write below, instead of being read back from disk on each tap.
        self._shift: dict | None = journal.get_state("shift")
        # Ticket keys, pickup key and denied tickets from the params package (validator.tickets reads them).
        self.ticket_params = TicketParams()

    def replace_ticket_params(self, params: TicketParams) -> None:
        """Use new ticket keys / pickup key / denied tickets from the next scan on."""
        self.ticket_params = params
        log.info("device %s: ticket keys %s, pickup key %s, %d denied ticket(s)", self.config.device_id,
                 sorted(params.public_keys) or "none", "set" if params.pickup_key else "none", len(params.denied))

    def at_stop(self, stop: int) -> None:
        """The bus reached ``stop`` (an index on the route, 0..255)."""
        if not 0 <= stop <= 0xFF:
            raise ValueError(f"stop index {stop} does not fit in the transit record (0..255)")
        self.stop = stop

    def replace_deny_list(self, deny_list: DenyList) -> None:
        """Use a new deny list from the next tap on. A tap in progress keeps the list it started with."""
        old, self.deny_list = self.deny_list, deny_list
        log.info("device %s: deny list v%d (%d cards) replaces v%d", self.config.device_id, deny_list.version,
                 deny_list.count, old.version)

    def replace_fares(self, fares: FareTable) -> None:
        """Use a new fare table from the next tap on (called between taps, never mid-purchase)."""
        old, self.fares = self.fares, fares
        log.info("device %s: fare table v%d replaces v%d", self.config.device_id, fares.version, old.version)

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
        except JournalFull as e:
            log.error("device %s: %s", self.config.device_id, e)  # says what to do: bring the link back
            return TapResult(Outcome.OUT_OF_SERVICE, detail=f"journal: {e}")
        except (JournalError, sqlite3.Error) as e:
            # No fare without a record on disk. A debit already sent stays as a grey record (if that write made
            # it) and is settled when the card comes back.
            log.error("device %s cannot write its journal (%s): taking no fares; free disk space or replace the "
                      "storage, nothing unsent is deleted", self.config.device_id, e)
            return TapResult(Outcome.OUT_OF_SERVICE, detail=f"journal: {e}")
        except apdu.StatusError as e:
            log.warning("card refused on %s: %s", self.config.device_id, e)
            return TapResult(_OUTCOME_OF_STATUS.get(e.sw, Outcome.CARD_UNREADABLE), detail=str(e))
        except (apdu.ResponseError, ValueError) as e:
            log.warning("card not understood on %s: %s", self.config.device_id, e)
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
            return self._block(card, info, now)
        if not info.start <= self._local_date(now) <= info.end:
            return TapResult(Outcome.CARD_EXPIRED, detail=f"valid {info.start} to {info.end}")
        if info.card_type == CardType.DRIVER:
            holder = apdu.parse_holder_info(apdu.check(card.exchange(apdu.read_holder_info()), "READ BINARY 0016"))
            return self._driver_card(holder.staff_no, asn, now)
        if self.shift is None:
            return TapResult(Outcome.NO_SHIFT)
        last = self._last_trip(card, asn)
        if (last is not None and last.terminal_id == self.terminal_id
                and timedelta(0) <= now - last.at < timedelta(seconds=self.config.double_tap_seconds)):
            return TapResult(Outcome.ALREADY_PAID)
        q = quote(self.fares, route=self.config.route, stop=self.stop, card_type=info.card_type, last=last, now=now)
        return self._purchase(card, info, q, now)

    def _last_trip(self, card: CardSession, asn: str) -> TransitRecord | None:
        """The card's transit record; None for a card that never rode, or whose record is not in our layout (another
        scheme wrote it, or it is damaged): that rider pays the plain fare and the purchase writes a fresh record."""
        try:
            raw = apdu.parse_capp_record(apdu.check(card.exchange(apdu.read_capp_record()), "READ RECORD 17/02"))
        except apdu.StatusError as e:
            if e.sw == apdu.SW_RECORD_NOT_FOUND:
                return None
            raise
        try:
            return TransitRecord.decode(raw)
        except TransitRecordError as e:
            log.warning("device %s: card %s has a transit record we cannot read (%s); treated as none",
                        self.config.device_id, asn, e)
            return None

    def _block(self, card: CardSession, info: apdu.PublicInfo, now: datetime) -> TapResult:
        """Lock a deny-listed card on the spot: a challenge from the card, the MAC over it from the PSAM (which
        holds the maintenance key), APPLICATION BLOCK. The refusal is recorded whether or not the lock worked."""
        reason = "on deny list; application blocked"
        try:
            challenge = apdu.parse_challenge(apdu.check(card.exchange(apdu.get_challenge()), "GET CHALLENGE"))
            mac = apdu.parse_psam_mac(apdu.check(self.psam.exchange(apdu.psam_block_mac(
                info.asn[-8:], info.issuer, challenge, info.algorithm)), "PSAM BLOCK MAC"))
            apdu.check(card.exchange(apdu.application_block(mac)), "APPLICATION BLOCK")
        except (ReaderError, apdu.StatusError, apdu.ResponseError) as e:
            reason = f"on deny list; could not block the application: {e}"
            log.warning("device %s: deny-listed card %s %s", self.config.device_id, info.asn.hex(), reason)
        record = self.journal.append(self._record(RecordKind.DENIED, now, card_asn=info.asn.hex(),
                                                  card_type=info.card_type, reason=reason))
        return TapResult(Outcome.CARD_BLOCKED, record=record, detail=reason)

    def _settle_grey(self, card: CardSession, grey: TapRecord, now: datetime) -> TapResult | None:
        """The card left mid-purchase last time: ask it whether that debit happened (GET TRANSACTION PROVE), and
        complete or cancel the grey record accordingly; never guess, never charge twice. Returns the answer for this
        tap when it was the rider's retry of that purchase, None when the tap goes on as a new one."""
        try:
            prove = apdu.parse_transaction_prove(apdu.check(
                card.exchange(apdu.get_transaction_prove(grey.tx_type, grey.card_ttc)), "GET TRANSACTION PROVE"))
        except apdu.StatusError as e:
            if e.sw != apdu.SW_PROVE_NOT_AVAILABLE:
                raise
            if self._spent_here(card, grey):
                # A card proves only its last transaction. This one has paid elsewhere since, and its log shows
                # this terminal's debit at the grey record's counter: the money moved, though its TAC can no longer
                # be had. Never cancel a debit: the grey record stays, named by the status alarm, for operations.
                log.warning("device %s seq %d: card %s was debited (its log says so) but proves a later transaction "
                            "now; grey record kept for operations", self.config.device_id, grey.device_seq,
                            grey.card_asn)
                return None
            self.journal.cancel(grey.device_seq)  # the card never debited
            log.info("device %s seq %d: card %s was not debited; grey record cancelled", self.config.device_id,
                     grey.device_seq, grey.card_asn)
            return None
        if self._counter_used_elsewhere(card, grey):
            # PROVE answers for the card's counter, whoever used it: the rider paid on another bus with the counter
            # this grey record holds. Completing it would record one debit twice (and the back office would take
            # the rider's genuine card for a clone).
            self.journal.cancel(grey.device_seq)
            log.info("device %s seq %d: card %s counter %d was used by another transaction; grey record cancelled",
                     self.config.device_id, grey.device_seq, grey.card_asn, grey.card_ttc)
            return None
        record = dataclasses.replace(grey, tac=prove.tac.hex())
        record = self.journal.complete_purchase(record) or record
        log.info("device %s seq %d: card %s was debited; grey record completed with its TAC", self.config.device_id,
                 grey.device_seq, grey.card_asn)
        if (now - grey.occurred_at).total_seconds() >= self.config.double_tap_seconds:
            return None  # settled an old trip; this tap is a new one
        return TapResult(Outcome.PAID, fare=grey.amount, balance=grey.balance_after, record=record)

    @staticmethod
    def _log_entry(card: CardSession, grey: TapRecord) -> apdu.LogRecord | None:
        """The card's own log record (READ RECORD, newest first) of the grey record's counter, if it still holds it."""
        for number in range(1, 11):
            answer = card.exchange(apdu.read_log_record(number))
            if answer[-2:] != b"\x90\x00":
                break
            entry = apdu.parse_log_record(answer[:-2])
            if entry.tx_type == grey.tx_type and entry.ttc == grey.card_ttc:
                return entry
        return None

    @classmethod
    def _counter_used_elsewhere(cls, card: CardSession, grey: TapRecord) -> bool:
        """The card's log shows the grey record's counter spent by another terminal or for another amount. A log
        that no longer reaches that far says nothing (False): the TAC, checked by the back office, still tells a
        borrowed answer from this terminal's own."""
        entry = cls._log_entry(card, grey)
        return entry is not None and (entry.terminal_id.hex() != grey.terminal_id or entry.amount != grey.amount)

    @classmethod
    def _spent_here(cls, card: CardSession, grey: TapRecord) -> bool:
        entry = cls._log_entry(card, grey)
        return (entry is not None and entry.terminal_id.hex() == grey.terminal_id and entry.amount == grey.amount
                and entry.date == bcd_date(grey.occurred_at) and entry.time == bcd_time(grey.occurred_at))

    def _local_date(self, now: datetime) -> date:
        return now.astimezone(self._zone).date()

    def _driver_card(self, staff_no: str, asn: str, now: datetime) -> TapResult:
        shift = self.shift
        if shift is not None and shift["driver"] == staff_no:
            record = self._append_shift(self._record(RecordKind.SHIFT_CLOSE, now, card_asn=asn,
                                                     card_type=CardType.DRIVER), None)
            return TapResult(Outcome.SHIFT_CLOSED, record=record,
                             report=self.journal.shift_report(shift["shift_no"]))
        handed_over = None
        if shift is not None:
            # Hand-over without sign-out: the old shift ends where the new driver's begins.
            self._append_shift(self._record(RecordKind.SHIFT_CLOSE, now, reason=f"handed over to {staff_no}"), None)
            handed_over = self.journal.shift_report(shift["shift_no"])
        last_no = (self.journal.get_state("last_shift") or {}).get("shift_no", 0)
        new = {"driver": staff_no, "shift_no": last_no + 1, "opened_at": int(now.timestamp())}
        record = self._append_shift(
            self._record(RecordKind.SHIFT_OPEN, now, driver=staff_no, shift_no=new["shift_no"], card_asn=asn,
                         card_type=CardType.DRIVER), new, last_shift=new)
        return TapResult(Outcome.SHIFT_OPENED, record=record, report=handed_over)

    def shift_report(self, shift_no: int | None = None) -> ShiftReport | None:
        """A shift's totals for the driver's screen or printer: the open or last shift, or any kept shift by number."""
        if shift_no is None:
            shift_no = self.journal.last_shift_no()
        return None if shift_no is None else self.journal.shift_report(shift_no)

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

    def _purchase(self, card: CardSession, info: apdu.PublicInfo, q: Quote, now: datetime) -> TapResult:
        try:
            init = apdu.parse_init_purchase(apdu.check(
                card.exchange(apdu.init_purchase(PURCHASE_KEY_INDEX, q.amount, self.terminal_id, composite=True)),
                "INITIALIZE FOR PURCHASE"))
        except apdu.StatusError as e:
            if e.sw == apdu.SW_INSUFFICIENT_FUNDS:
                return TapResult(Outcome.INSUFFICIENT_BALANCE, fare=q.amount, detail=str(e))
            raise
        if init.balance < q.required_balance:
            # Nothing was debited: the card drops the open purchase with the next command.
            return TapResult(Outcome.INSUFFICIENT_BALANCE, fare=q.amount, balance=init.balance,
                             detail=f"balance {init.balance} fen is below the {q.required_balance} fen needed")
        sam = apdu.parse_psam_init_purchase(apdu.check(self.psam.exchange(apdu.psam_init_purchase(
            init.random, init.ttc, q.amount, apdu.TX_COMPOSITE, now, init.key_version, init.algorithm,
            info.asn[-8:], info.issuer)), "PSAM INIT FOR PURCHASE"))
        shift = self.shift or {}
        trip = TransitRecord(state=TripState.ON_BOARD if q.step is Step.ENTRY else TripState.DONE,
                             route=self.config.route, vehicle=self.config.vehicle, driver=shift.get("driver", ""),
                             terminal_id=self.terminal_id, at=now, amount=q.amount, full_fare=q.full_fare,
                             entry_stop=q.entry_stop, exit_stop=q.exit_stop)
        record = self.journal.begin_purchase(self._record(
            RecordKind.PURCHASE, now, card_asn=info.asn.hex(), card_type=info.card_type, card_ttc=init.ttc,
            amount=q.amount, balance_after=init.balance - q.amount, terminal_id=self.terminal_id.hex(),
            terminal_seq=sam.terminal_seq, tx_type=apdu.TX_COMPOSITE, algorithm=init.algorithm,
            full_fare=q.full_fare, entry_stop=q.entry_stop, exit_stop=q.exit_stop, reason=q.note))
        try:
            apdu.check(card.exchange(apdu.update_capp_cache(trip.encode())), "UPDATE CAPP DATA CACHE")
            debit = apdu.parse_debit(apdu.check(card.exchange(
                apdu.debit_purchase(sam.terminal_seq, bcd_date(now), bcd_time(now), sam.mac1)),
                "DEBIT FOR PURCHASE"))
        except ReaderError:
            # We cannot know whether the card debited: the grey record stays until the card is seen again.
            raise
        except apdu.ResponseError as e:
            # Nor here; and the rider must be asked to tap again (so the card comes back), not told it is unknown.
            raise CommunicationError(f"DEBIT FOR PURCHASE answer unreadable: {e}") from e
        except apdu.StatusError as refused:
            # A refusal, or an answer garbled on its way into one: only the card knows, so ask it while it is here.
            debit = self._prove(card, record, refused)
        reason = q.note
        try:
            apdu.check(self.psam.exchange(apdu.psam_verify_mac2(debit.mac2)), "PSAM VERIFY MAC2")
        except apdu.StatusError as e:
            # The card debited (it gave a TAC) but its MAC2 is wrong: keep the record, flag it for the back office.
            reason = "; ".join(filter(None, (q.note, f"MAC2 did not verify: {e}")))
            log.error("device %s seq %d: MAC2 did not verify: %s", self.config.device_id, record.device_seq, e)
        record = dataclasses.replace(record, tac=debit.tac.hex(), reason=reason)
        record = self.journal.complete_purchase(record) or record  # as written: texts within the wire's limits
        return TapResult(Outcome.ENTERED if q.step is Step.ENTRY and not q.amount else Outcome.PAID,
                         fare=q.amount, balance=record.balance_after, record=record)


    def _prove(self, card: CardSession, record: TapRecord, refused: apdu.StatusError) -> apdu.DebitResult:
        """DEBIT answered an error status: GET TRANSACTION PROVE for this purchase's TTC says whether the card
        debited after all (then its TAC and MAC2 complete the record as usual) or not (then the grey record is
        cancelled and the refusal stands). If the card cannot say, the grey record stays for its next tap."""
        try:
            prove = apdu.parse_transaction_prove(apdu.check(card.exchange(
                apdu.get_transaction_prove(record.tx_type, record.card_ttc)), "GET TRANSACTION PROVE"))
        except apdu.StatusError as e:
            if e.sw != apdu.SW_PROVE_NOT_AVAILABLE:
                raise
            self.journal.cancel(record.device_seq)  # the card never debited: nothing was taken
            raise refused from None
        log.warning("device %s seq %d: DEBIT answered %04X but the card proves it debited; completing the record",
                    self.config.device_id, record.device_seq, refused.sw)
        return apdu.DebitResult(tac=prove.tac, mac2=prove.mac2)


# Status words a card answers to an ordinary tap, and what the rider is told.
_OUTCOME_OF_STATUS = {
    apdu.SW_APP_BLOCKED: Outcome.CARD_BLOCKED,
    apdu.SW_INSUFFICIENT_FUNDS: Outcome.INSUFFICIENT_BALANCE,
    apdu.SW_MAC_INVALID: Outcome.TAP_AGAIN,  # a MAC the card did not accept: nothing was debited, try again
}
