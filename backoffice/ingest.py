"""Ingest: validators' tap batches in, each record stored exactly once, and the sequences to acknowledge out.

The use case is :meth:`Ingest.messages`: it takes the messages a worker gathered (a few ms' worth) and, inside the
caller's transaction,

1. checks each message: its topic names a device; the device's message MAC verifies with that device's key
   (``wire.devicekeys.mac_key(master, device)``, so a batch moved to another device's topic fails here too); an
   unsigned v1 batch is refused unless ``accept_unsigned`` (the migration window for old validators); the batch
   says the device its topic says; the device is registered to that operator;
2. checks each purchase: its PSAM is the one registered for the device at the record's time (the registry's
   device versions, see :class:`DeviceDirectory`), its type and algorithm are known, its TAC verifies with the
   card's TAC key, which only the key service holds (``backoffice.keyservice.KeyService.purchase_tac_ok``: raw
   issuer keys never reach ingest, so an HSM can stand behind it);
3. looks every purchase up by the card's own counter (card ASN, card TTC; on PostgreSQL over the service days within
   ``CARD_WINDOW_DAYS`` of the batch's, tap being partitioned by day): the same transaction already stored from
   another record with different content is **fraud** (quarantined, a ``fraud_flag`` row naming both records, the
   card's status set to ``fraud`` so the next deny list carries it); with the same content it is a copy, not
   counted twice;
4. writes the good records skipping keys already stored ((device_id, device_seq): a batch sent again is duplicates),
   on PostgreSQL by COPY into a temporary table and one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``;
5. quarantines everything else with its reason, and returns per message what to acknowledge.

A ``ticket_use`` record (a QR ticket or pickup code accepted on a bus) goes to the ticket_use table instead of the
tap table, once by the same key (backoffice.tickets.uses): a use beyond what its ticket allows (the same ticket on
another offline bus) is stored flagged, not as revenue, counted in ``fraud``, and puts the ticket on the deny list.

The caller commits, and only then acknowledges: a crash in between makes the validator send the batch again, and
its records come back as duplicates. A refused batch (forged MAC, foreign topic, unknown device, unsigned) is
quarantined and never acknowledged: the validator keeps its records, and nothing of it is ever cleared.

Several workers may run this at once (MQTT shared subscription). On PostgreSQL each transaction first takes
transaction-scoped advisory locks on the devices and cards it touches, all in one sorted statement, so two workers
never race on one device's keys nor on one card's counter (a cloned card used on two buses at once is exactly the
case the fraud check is for), and cannot deadlock on each other. SQLite has one writer at a time anyway.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import operator
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Connection, func, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from backoffice import partitions
from backoffice.models import Card, Device, DeviceVersion, FraudFlag, Operator, Quarantine, Tap, tap_service_day
from backoffice.tickets import uses as ticket_uses
from epurse.apdu import ALG_3DES, ALG_SM4, TX_COMPOSITE, TX_PURCHASE
from backoffice.keyservice import KeyService, as_key_service
from epurse.crypto import bcd_date, bcd_time
from wire import codec, devicekeys, topics
from wire.records import RecordKind, TapRecord

log = logging.getLogger(__name__)

# Tap columns in COPY order: the record's own fields, then when it arrived. A ticket_use record's own fields go to
# the ticket_use table (backoffice.tickets.uses), not to the tap table.
TICKET_FIELDS = ("ticket_id", "ticket_use", "presented")
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(TapRecord) if f.name not in TICKET_FIELDS)
TAP_COLUMNS = (*_RECORD_FIELDS, "received_at", "service_day")
PURCHASE = RecordKind.PURCHASE.value
# On PostgreSQL the card counter look-up (step 3) reads the service days within this many days of the batch's
# own days: tap is partitioned by day, and every attached day's partition costs an index probe per pair (at 372
# attached days the look-up of 2,000 pairs took 5.7x as long as over one table; bench/ingest.py). A transaction's
# copy or clone whose days lie further apart is not seen here; SQLite (one table) looks at every day.
CARD_WINDOW_DAYS = 7


@dataclasses.dataclass
class IngestResult:
    device_id: str
    operator: str
    ack_seqs: list[int]  # the device's records now safe in the database (stored, already stored, or quarantined)
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    fraud: int = 0  # of the quarantined: second records of a card transaction already stored (fraud_flag rows)
    refused: str | None = None  # why the whole message was refused (then nothing is acknowledged)
    signed: bool = True  # False: a v1 batch accepted in the migration window, acknowledged the v1 way
    epoch: int = 0  # the journal the records come from: the ack names it (an epoch-0 batch gets the old ack)
    quarantined_seqs: list[int] = dataclasses.field(default_factory=list)  # of ack_seqs: held, with a reason

    def hold(self, seq: int) -> None:
        """One of the message's records went to quarantine (and is acknowledged as quarantined, not stored)."""
        self.quarantined += 1
        self.quarantined_seqs.append(seq)


# ---------------------------------------------------------------------- TAC


def _tac_ok(keys, record: TapRecord) -> bool:
    """The purchase's TAC, checked by the key service (epurse's one TAC implementation behind it, or an HSM).
    The card wrote the date and time as the record's UTC instant in BCD."""
    at = record.occurred_at
    try:
        tac = bytes.fromhex(record.tac)
    except ValueError:
        return False
    return keys.purchase_tac_ok(asn=_hex_bytes(record.card_asn), algorithm=record.algorithm, amount=record.amount,
                                tx_type=record.tx_type, terminal_id=_hex_bytes(record.terminal_id),
                                terminal_seq=record.terminal_seq, date4=bcd_date(at), time3=bcd_time(at), tac=tac)


_hex_bytes = functools.lru_cache(maxsize=100_000)(bytes.fromhex)  # card ASNs and PSAM numbers come back daily


# ---------------------------------------------------------------------- devices


@dataclasses.dataclass(frozen=True, slots=True)
class Registration:
    """A registered validator as ingest checks it: its operator, and which PSAM (terminal number) it held when.

    ``psams`` are the registry's device versions (``device_version``), oldest first: (valid_from, terminal_id). A
    purchase must carry the PSAM registered *at the record's time*, so a late upload of taps made before a PSAM swap
    is as genuine after the swap as before it, and the old PSAM's taps after the swap are not.
    """

    device_id: str
    operator: str
    psams: tuple[tuple[datetime, str], ...]

    def terminal_at(self, when: datetime) -> str:
        """The PSAM in force at ``when`` (as ``backoffice.registry`` reads history): the last version that started
        at or before it; before the first version, the first (a bus's taps from before the clerk typed it in);
        after retirement, the last."""
        psams = self.psams
        if len(psams) == 1 or when >= psams[-1][0]:
            return psams[-1][1]
        chosen = psams[0][1]
        for valid_from, terminal in psams:
            if valid_from > when:
                break
            chosen = terminal
        return chosen


class DeviceDirectory:
    """Registered validators (device_id -> :class:`Registration`), kept in memory because ingest looks one up for
    every message, and kept true to the registry:

    - a device not in memory is read at once (a validator registered while ingest runs needs no restart);
    - at most every ``refresh_seconds`` one small query reads the registry's stamp (how many device versions there
      are, and the newest id: an edit, a move, a PSAM swap, an addition each add a version); when it changed, the
      whole directory is dropped and devices are read again as they come;
    - a purchase whose PSAM is not the one in memory for its time is checked again against the device's versions
      in the database before anything is quarantined (:meth:`psam_problem`), so a PSAM swap the clerk has just
      saved holds for the very next tap, whatever the stamp said a moment ago.
    """

    def __init__(self, refresh_seconds: float = 1.0, clock=time.monotonic):
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._known: dict[str, Registration] = {}
        self._stamp: tuple | None = None
        self._checked = float("-inf")

    def get(self, conn: Connection, device_id: str) -> Registration | None:
        now = self._clock()
        if now - self._checked >= self.refresh_seconds:
            self._checked = now
            stamp = tuple(conn.execute(select(func.count(), func.max(DeviceVersion.id))).one())
            if stamp != self._stamp:
                self._known.clear()
                self._stamp = stamp
        found = self._known.get(device_id)
        if found is None:
            found = self.load(conn, device_id)
        return found

    def load(self, conn: Connection, device_id: str) -> Registration | None:
        """The device as the database says now (its versions oldest first), remembered."""
        row = conn.execute(select(Device.operator, Device.terminal_id).where(Device.device_id == device_id)).first()
        if row is None:
            self._known.pop(device_id, None)
            return None
        psams = tuple((_aware(v.valid_from), v.terminal_id) for v in conn.execute(
            select(DeviceVersion.valid_from, DeviceVersion.terminal_id).where(DeviceVersion.device_id == device_id)
            .order_by(DeviceVersion.valid_from, DeviceVersion.id)))
        found = Registration(device_id, row.operator, psams or ((datetime.min.replace(tzinfo=UTC),
                                                                  row.terminal_id),))
        self._known[device_id] = found
        return found

    def psam_problem(self, conn: Connection, registration: Registration, record: TapRecord) -> str | None:
        """None when the purchase carries the PSAM registered for its device at its time; else the reason, after
        reading the device again from the database (memory may be a moment behind a swap)."""
        if record.terminal_id == registration.terminal_at(record.occurred_at):
            return None
        fresh = self.load(conn, registration.device_id)
        if fresh is not None:
            expected = fresh.terminal_at(record.occurred_at)
            if record.terminal_id == expected:
                return None
        else:
            expected = registration.terminal_at(record.occurred_at)
        return (f"terminal {record.terminal_id} is not the PSAM registered for this device ({expected}) at "
                f"{record.occurred_at:%Y-%m-%d %H:%M:%S}Z")


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# ---------------------------------------------------------------------- the use case


@dataclasses.dataclass
class _Candidate:
    """A record that passed its own checks, waiting for the dedupe and fraud look-ups."""

    result: IngestResult
    topic: str
    record: TapRecord
    day: object = None  # the service day it is stored under (set once the operators' day rules are read)


class Ingest:
    """What ingest needs to check messages (issuer keys, the device master, the registry) and how it writes.

    ``write``: ``"copy"`` (PostgreSQL: COPY into a temporary table, then one INSERT ... SELECT ... ON CONFLICT DO
    NOTHING RETURNING) or ``"insert"`` (multi-row INSERT ... ON CONFLICT DO NOTHING RETURNING, SQLAlchemy's
    insertmanyvalues; the only choice on SQLite). bench/ingest.py measures both.
    """

    def __init__(self, *, keys: KeyService, master: bytes, devices: DeviceDirectory | None = None,
                 accept_unsigned: bool = False, write: str = "copy", tac_cards: int = 100_000,
                 card_window_days: int = CARD_WINDOW_DAYS):
        """``keys``: the issuer key service (raw ``IssuerKeys``, in tests and tools, are wrapped in a
        ``LocalKeyService`` keeping ``tac_cards`` cards' TAC keys ready)."""
        if write not in ("copy", "insert"):
            raise ValueError(f"write must be 'copy' or 'insert', not {write!r}")
        self.keys = as_key_service(keys, tac_cards=tac_cards)
        self.master = master
        self.devices = devices or DeviceDirectory()
        self.accept_unsigned = accept_unsigned
        self.write = write
        self.card_window_days = card_window_days
        self._mac_keys = functools.lru_cache(maxsize=100_000)(lambda device: devicekeys.mac_key(master, device))

    def mac_key(self, device_id: str) -> bytes:
        return self._mac_keys(device_id)

    def encode_ack(self, result: IngestResult) -> bytes:
        """MAC'd with the device's key; an old validator's v1 batch gets the v1 JSON ack it can read."""
        key = self.mac_key(result.device_id) if result.signed else None
        return codec.encode_ack(result.device_id, result.ack_seqs, key=key, epoch=result.epoch,
                                quarantined=result.quarantined_seqs)

    def batch(self, conn: Connection, topic: str, payload: bytes, *, now: datetime | None = None) -> IngestResult:
        return self.messages(conn, [(topic, payload)], now=now)[0]

    def messages(self, conn: Connection, messages: Sequence[tuple[str, bytes]], *,
                 now: datetime | None = None, quarantined: list[dict] | None = None) -> list[IngestResult]:
        """Store the messages inside the caller's transaction; the caller commits, then acknowledges each
        result's ``ack_seqs`` (encoded with :meth:`encode_ack`). ``quarantined``: a list that gets the quarantine
        rows instead of the table (a release of a quarantined record keeps its one row: backoffice.quarantine)."""
        now = now or datetime.now(UTC)
        quarantine: list[dict] = []
        candidates: list[_Candidate] = []
        results = []
        for topic, payload in messages:
            result, accepted = self._open(conn, topic, payload, now, quarantine)
            results.append(result)
            for record in accepted:
                problem = self._record_problem(record, accepted.terminal)
                if problem:
                    quarantine.append(_quarantine_row(now, topic, result.device_id, record.device_seq, problem,
                                                      _record_payload(record)))
                    result.hold(record.device_seq)
                else:
                    candidates.append(_Candidate(result, topic, record))
        store = _store_for(conn, self.write)
        # The operators' day rules are read under a shared lock that the registry takes exclusively before it
        # changes a rule (backoffice.partitions.day_rule_change_problem): a rule cannot change between this read and
        # the commit of the taps stored by it.
        day_operators = sorted({c.record.operator for c in candidates if c.record.kind is not RecordKind.TICKET_USE})
        store.lock(_lock_keys(candidates), shared=[partitions.day_rule_lock_key(op) for op in day_operators])
        rules = _day_rules(conn, day_operators)
        for c in candidates:
            if c.record.kind is not RecordKind.TICKET_USE:
                c.day = tap_service_day(c.record.occurred_at, *rules[c.record.operator])
        ticket_uses = [c for c in candidates if c.record.kind is RecordKind.TICKET_USE]
        if ticket_uses:
            candidates = [c for c in candidates if c.record.kind is not RecordKind.TICKET_USE]
            _store_ticket_uses(conn, ticket_uses, now, quarantine)
        repeats: list[_Candidate] = []  # a key a second time in these messages (filled by _sort_out)
        taps, fraud_flags, fraud_cards = self._sort_out(conn, store, candidates, now, quarantine, repeats)
        # The key includes the service day (the partition column): a key stored under another day is not seen by
        # ON CONFLICT. A resend maps to the same day (backoffice.partitions), so such a key is a record with other
        # content (another time): a conflict, looked for here; and keys of days detached to the archive.
        elsewhere = store.archived(taps)
        elsewhere.update(store.on_other_days([c for c in taps if c.record.key not in elsewhere],
                                             self.card_window_days))
        if elsewhere:
            taps, repeats = [c for c in taps if c.record.key not in elsewhere], repeats + [
                c for c in taps if c.record.key in elsewhere]
        stored = store.insert(taps, now)
        clashes = [c for c in taps if c.record.key not in stored] + repeats
        for c in taps:
            if c.record.key in stored:
                c.result.stored += 1
        # A key already stored is a duplicate only if the stored record is the same record; otherwise (a journal
        # replaced without an epoch, a forgery with the device's key) it is a conflict, held with its reason.
        clash_keys = {c.record.key for c in clashes}
        before = store.records_by_key(clash_keys, {c.day for c in taps + repeats if c.record.key in clash_keys}) \
            if clashes else {}
        before.update(elsewhere)
        for c in clashes:
            _duplicate_or_conflict(c, before.get(c.record.key), now, quarantine)
        _mark_signed(quarantine, results)
        if quarantined is not None:
            quarantined.extend(quarantine)
        else:
            _insert_ignoring_duplicates(conn, Quarantine.__table__, quarantine)
        if fraud_flags:
            _insert_ignoring_duplicates(conn, FraudFlag.__table__, fraud_flags)
            for asn in sorted(fraud_cards):  # one at a time, in order: two workers never wait on each other in a ring
                conn.execute(update(Card).where(Card.asn == asn, Card.status != "fraud").values(status="fraud"))
        return results

    def _open(self, conn, topic, payload, now, quarantine) -> tuple[IngestResult, _Accepted]:
        """The message's checks (1.); its records when they pass, else nothing and the reason in quarantine."""
        try:
            operator, device_id, message = topics.parse(topic)
            if message != "taps" or device_id == topics.FLEET:
                raise topics.TopicError(f"ingest reads tap batches, not {message!r} on {topic!r}")
        except topics.TopicError as e:
            quarantine.append(_quarantine_row(now, topic, "?", None, f"not a tap topic: {e}", payload))
            return IngestResult("?", "?", [], quarantined=1, refused=str(e)), _Accepted()
        result = IngestResult(device_id, operator, [])
        if len(payload) > codec.MAX_PAYLOAD:  # checked before anything reads it; quarantine keeps only its head
            result.refused = (f"message of {len(payload):,} bytes, more than the {codec.MAX_PAYLOAD:,} any valid batch "
                              f"has: refused unread, its first {OVERSIZE_KEPT:,} bytes kept")
            quarantine.append(_quarantine_row(now, topic, device_id, None, result.refused, payload))
            result.quarantined = 1
            log.warning("batch on %s refused: %s", topic, result.refused)
            return result, _Accepted()

        def refuse(reason, records=()):
            # Nothing is acknowledged: a batch that is forged, not what its topic says, unsigned, or from a device
            # this back office does not know must not make any validator forget records. Quarantine keeps the
            # message for operations: one row per record when they could be read (a resend adds nothing), else the
            # payload whole.
            result.refused = reason
            if records:
                quarantine.extend(_quarantine_row(now, topic, device_id, r.device_seq, reason, _record_payload(r))
                                  for r in records)
            else:
                quarantine.append(_quarantine_row(now, topic, device_id, None, reason, payload))
            result.quarantined = max(1, len(records))
            log.warning("batch on %s refused: %s", topic, reason)
            return result, _Accepted()

        try:
            batch = codec.decode_batch(payload, key=self.mac_key(device_id))
        except codec.MacError as e:
            return refuse(f"forged or misrouted: the message MAC does not verify with the key of device "
                          f"{device_id} ({e})")
        except codec.WireError as e:
            return refuse(f"undecodable batch: {e}")
        result.signed = batch.signed  # also for a refused batch: quarantine keeps it (_mark_signed)
        if batch.device_id != device_id or batch.operator != operator:
            return refuse(f"batch says device {batch.device_id!r} of {batch.operator!r} but came on the topic of "
                          f"{device_id!r} of {operator!r}", batch.records)
        if not batch.signed and not self.accept_unsigned:
            return refuse(f"unsigned v{batch.version} batch refused: this back office takes only MAC'd batches "
                          "(start ingest with --accept-unsigned while old validators are upgraded)", batch.records)
        registered = self.devices.get(conn, device_id)
        if registered is None:
            return refuse(f"device {device_id} is not registered: add it with `farebox device add` and re-send",
                          batch.records)
        if registered.operator != operator:
            return refuse(f"device {device_id} belongs to operator {registered.operator!r}, not {operator!r}",
                          batch.records)
        result.epoch = batch.epoch
        for item in batch.set_aside:  # records the validator could not encode: held here, so the bus can go on
            quarantine.append(_quarantine_row(now, topic, device_id, item.device_seq,
                                              f"set aside by the validator (could not encode it): {item.reason}",
                                              item.raw))
            result.hold(item.device_seq)
        if batch.set_aside:
            log.warning("device %s: %d records set aside by the validator quarantined (journal %d, seqs %s)",
                        device_id, len(batch.set_aside), batch.epoch, [i.device_seq for i in batch.set_aside])
        result.ack_seqs = [r.device_seq for r in batch.records] + [i.device_seq for i in batch.set_aside]
        result.signed = batch.signed
        return result, _Accepted(batch.records, functools.partial(self.devices.psam_problem, conn, registered))

    def _record_problem(self, record: TapRecord, psam_problem) -> str | None:
        if record.kind is not RecordKind.PURCHASE:
            return None
        wrong_psam = psam_problem(record)  # the PSAM registered at the record's time (DeviceDirectory.psam_problem)
        if wrong_psam:
            return wrong_psam
        if record.tx_type not in (TX_PURCHASE, TX_COMPOSITE):
            return f"transaction type {record.tx_type:02X} is not a purchase (06) or a composite purchase (09)"
        if record.algorithm not in (ALG_3DES, ALG_SM4):
            return f"algorithm {record.algorithm:02X} is neither 3DES (00) nor SM4 (04)"
        # A zero amount is a real fare: a distance-fare entry, or a free ride on a concession card; the TAC covers it.
        if not _tac_ok(self.keys, record):
            return "TAC does not verify with the issuer's key: record altered or not from a genuine card"
        return None

    def _sort_out(self, conn, store, candidates, now, quarantine, repeats):
        """Split the candidates into taps to insert and second records of a card transaction (fraud or copy)."""
        purchases = {(c.record.card_asn, c.record.card_ttc) for c in candidates
                     if c.record.kind is RecordKind.PURCHASE}
        days = [c.day for c in candidates if c.record.kind is RecordKind.PURCHASE]
        window = (min(days) - timedelta(days=self.card_window_days),
                  max(days) + timedelta(days=self.card_window_days)) if days else None
        first: dict[tuple[str, int], _Seen] = {}
        for seen in store.purchases_by_card_counter(purchases, window):
            first.setdefault((seen.card_asn, seen.card_ttc), seen)
        taps, flags, cards = [], [], set()
        keys_here: set[tuple[str, int, int]] = set()
        for c in candidates:
            r = c.record
            if r.key in keys_here:  # a key twice in these messages: told apart after the insert (see messages)
                repeats.append(c)
                continue
            if r.kind is RecordKind.PURCHASE:
                seen = first.get((r.card_asn, r.card_ttc))
                if seen is None:
                    first[(r.card_asn, r.card_ttc)] = r  # a record of these messages: made a _Seen only if needed
                    seen = None
                elif type(seen) is TapRecord:
                    seen = _Seen.of(seen)
                if seen is not None and seen.key != r.key:
                    differs = seen.differences(r)
                    where = f"device {seen.device_id} seq {seen.device_seq}"
                    if differs:
                        reason = (f"fraud: card {r.card_asn} counter {r.card_ttc} already stored from {where} "
                                  f"with different {', '.join(differs)}")
                        flags.append({"detected_at": now, "card_asn": r.card_asn, "card_ttc": r.card_ttc,
                                      "first_device_id": seen.device_id, "first_device_seq": seen.device_seq,
                                      "second_device_id": r.device_id, "second_device_seq": r.device_seq,
                                      "detail": reason[:500]})
                        cards.add(r.card_asn)
                        c.result.fraud += 1
                        log.warning("device %s seq %d: %s", r.device_id, r.device_seq, reason)
                    else:
                        reason = (f"copy of card {r.card_asn} transaction {r.card_ttc} already stored from {where}: "
                                  "not counted twice")
                    quarantine.append(_quarantine_row(now, c.topic, r.device_id, r.device_seq, reason,
                                                      _record_payload(r)))
                    c.result.hold(r.device_seq)
                    continue
            keys_here.add(r.key)
            taps.append(c)
        return taps, flags, cards


def ingest_batch(conn: Connection, topic: str, payload: bytes, *, keys: KeyService, master: bytes,
                 devices: DeviceDirectory | None = None, accept_unsigned: bool = False,
                 now: datetime | None = None) -> IngestResult:
    """One message through a one-off :class:`Ingest` (tests, tools); a long-running consumer keeps one Ingest."""
    ingest = Ingest(keys=keys, master=master, devices=devices, accept_unsigned=accept_unsigned, tac_cards=16)
    return ingest.batch(conn, topic, payload, now=now)


# ---------------------------------------------------------------------- helpers


class _Accepted(tuple):
    """A message's records that passed the message checks, and the check of the PSAM they must carry."""

    def __new__(cls, records: Iterable[TapRecord] = (), terminal=None):
        self = super().__new__(cls, records)
        self.terminal = terminal
        return self


@dataclasses.dataclass(frozen=True, slots=True)
class _Seen:
    """A stored purchase, as far as the fraud check compares it."""

    card_asn: str
    card_ttc: int
    device_id: str
    device_seq: int
    amount: int
    terminal_id: str
    terminal_seq: int
    tac: str
    at: int  # POSIX seconds
    epoch: int = 0

    @classmethod
    def of(cls, r: TapRecord) -> _Seen:
        return cls(r.card_asn, r.card_ttc, r.device_id, r.device_seq, r.amount, r.terminal_id, r.terminal_seq,
                   r.tac, int(r.occurred_at.timestamp()), r.epoch)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.device_id, self.epoch, self.device_seq)

    def differences(self, r: TapRecord) -> list[str]:
        mine = {"amount": self.amount, "terminal": self.terminal_id, "terminal_seq": self.terminal_seq,
                "TAC": self.tac, "time": self.at}
        theirs = {"amount": r.amount, "terminal": r.terminal_id, "terminal_seq": r.terminal_seq, "TAC": r.tac,
                  "time": int(r.occurred_at.timestamp())}
        return [name for name in mine if mine[name] != theirs[name]]


def _as_utc_seconds(value: datetime) -> int:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return int((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())


def _duplicate_or_conflict(c: _Candidate, before, now, quarantine: list[dict]) -> None:
    """``c``'s key (device, epoch, seq) is already taken by ``before`` (a stored row's values, or a record of these
    same messages): the same content is a duplicate (a resend); different content is a conflict, quarantined and
    acknowledged as quarantined, never counted as a duplicate (DESIGN: an acknowledged duplicate is byte-equal)."""
    r = c.record
    differs = _content_differences(before, r) if before is not None else ["(stored row not found)"]
    if not differs:
        c.result.duplicates += 1
        return
    reason = (f"conflict: device {r.device_id} journal {r.epoch} seq {r.device_seq} is already stored with "
              f"different {', '.join(differs)}; not a duplicate (a journal replaced without a new epoch, or a "
              "forgery): review it")
    log.warning("device %s seq %d: %s", r.device_id, r.device_seq, reason)
    quarantine.append(_quarantine_row(now, c.topic, r.device_id, r.device_seq, reason, _record_payload(r)))
    c.result.hold(r.device_seq)


def _content_differences(before, r: TapRecord) -> list[str]:
    """The fields in which ``r`` differs from ``before`` (a TapRecord, or a stored row's mapping)."""
    get = (lambda name: getattr(before, name)) if isinstance(before, TapRecord) else before.__getitem__
    out = []
    for name in _RECORD_FIELDS:
        mine, theirs = get(name), getattr(r, name)
        if name == "occurred_at":
            mine, theirs = _as_utc_seconds(mine), _as_utc_seconds(theirs)
        elif name == "kind":
            mine, theirs = getattr(mine, "value", mine), theirs.value
        if mine != theirs:
            out.append(name)
    return out


def _store_ticket_uses(conn: Connection, candidates: list[_Candidate], now, quarantine: list[dict]) -> None:
    """Ticket uses go to their own table, once by key (backoffice.tickets.uses): a use beyond what the ticket allows
    is stored flagged (not revenue) and counted as fraud here; a conflict or a use of no known ticket is held."""
    outcomes = ticket_uses.store_records(conn, [c.record for c in candidates], now=now)
    for c, outcome in zip(candidates, outcomes, strict=True):
        if outcome.status == "stored":
            c.result.stored += 1
            if outcome.flag in ticket_uses.FRAUD_FLAGS:
                c.result.fraud += 1
        elif outcome.status == "duplicate":
            c.result.duplicates += 1
        else:
            r = c.record
            quarantine.append(_quarantine_row(now, c.topic, r.device_id, r.device_seq, outcome.reason,
                                              _record_payload(r)))
            c.result.hold(r.device_seq)


def _day_rules(conn: Connection, operators: list[str]) -> dict[str, tuple[str, int]]:
    """Each operator's day rule (time zone, cut-off hour) as the registry holds it; an operator the registry does not
    know (cannot pass the device check, but a tool may call in) gets the default rule."""
    rules = {op: ("Asia/Shanghai", 3) for op in operators}
    if operators:
        rules.update((r.code, (r.timezone, r.cutoff_hour)) for r in conn.execute(
            select(Operator.code, Operator.timezone, Operator.cutoff_hour).where(Operator.code.in_(operators))))
    return rules


def _lock_keys(candidates: list[_Candidate]) -> list[int]:
    names = {f"device|{c.record.device_id}" for c in candidates}
    names.update(f"card|{c.record.card_asn}" for c in candidates if c.record.kind is RecordKind.PURCHASE)
    names.update(ticket_uses.lock_name(c.record) for c in candidates if c.record.kind is RecordKind.TICKET_USE)
    # Stable across processes (Python's hash() is salted per process): the first 8 bytes of BLAKE2b.
    return sorted({int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest(), "big", signed=True)
                   for n in names})


def _record_payload(record: TapRecord) -> bytes:
    """One record kept in quarantine, readable by people and tools: the v1 JSON form (unsigned, never sent)."""
    return codec.encode_batch_json([record])


# What quarantine keeps of a message too big to be a batch (codec.MAX_PAYLOAD): enough for a person to see what it
# was, never the megabytes someone pushed at ingest.
OVERSIZE_KEPT = 4096


def _quarantine_row(now, topic, device_id, seq, reason, payload) -> dict:
    if len(payload) > codec.MAX_PAYLOAD:
        payload = payload[:OVERSIZE_KEPT]
    return {"received_at": now, "received_day": now.astimezone(UTC).date(), "topic": topic[:200],
            "device_id": device_id[:32], "device_seq": seq, "reason": reason[:500], "payload": payload}


def _mark_signed(rows: list[dict], results: list[IngestResult]) -> None:
    """Each quarantine row naming a record says whether the message that carried it verified with its device's
    key, so a release (backoffice.quarantine) puts it through ingest again as the same kind of message. Rows that
    keep a whole message (no seq) keep its MAC too: None. A device with an unsigned message among these: False."""
    signed: dict[str, bool] = {}
    for r in results:
        signed[r.device_id] = signed.get(r.device_id, True) and r.signed
    for row in rows:
        row["signed"] = None if row["device_seq"] is None else signed.get(row["device_id"], False)


def _insert_ignoring_duplicates(conn: Connection, table, rows: list[dict]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING for all rows (a resent record is quarantined or flagged once).

    Quarantine's key includes the day it arrived (its partition column), so a record with the same reason already
    kept on another day is left out first: the caller holds the device's advisory lock (ingest's lock statement), so
    no other worker adds it meanwhile."""
    if rows and table.name == "quarantine":
        rows = _not_yet_quarantined(conn, rows)
    if rows:
        conn.execute(_insert_statement(conn.dialect.name, table), rows)


def _not_yet_quarantined(conn: Connection, rows: list[dict]) -> list[dict]:
    keyed = sorted({(r["device_id"], r["device_seq"]) for r in rows if r["device_seq"] is not None})
    kept: set[tuple] = set()
    for i in range(0, len(keyed), 400):
        kept.update(tuple(r) for r in conn.execute(
            select(Quarantine.device_id, Quarantine.device_seq, Quarantine.reason)
            .where(tuple_(Quarantine.device_id, Quarantine.device_seq).in_(keyed[i:i + 400]))))
    return [r for r in rows if (r["device_id"], r["device_seq"], r["reason"]) not in kept]


@functools.cache
def _insert_statement(dialect_name: str, table, returning: tuple = ()):
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    statement = dialect.insert(table).on_conflict_do_nothing()
    return statement.returning(*(table.c[name] for name in returning)) if returning else statement


# ---------------------------------------------------------------------- the writers


class _Store:
    """Multi-row INSERT ... ON CONFLICT DO NOTHING RETURNING (any database)."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def lock(self, keys: list[int], shared: list[int] = ()) -> None:
        """SQLite: one writer at a time already (a stale read makes the commit fail and the batch is retried)."""

    def archived(self, candidates: list[_Candidate]) -> dict[tuple[str, int, int], dict]:
        """Keys of these candidates already stored in a day detached to the archive (PostgreSQL only)."""
        return {}

    def on_other_days(self, candidates: list[_Candidate], window_days: int) -> dict[tuple[str, int, int], dict]:
        """Keys of these candidates stored under another service day than the candidate's (SQLite: any day)."""
        if not candidates:
            return {}
        days = {c.record.key: c.day for c in candidates}
        found = self.records_by_key(set(days), (), with_day=True)
        return {k: row for k, row in found.items() if row["service_day"] != days[k]}

    def purchases_by_card_counter(self, pairs: set[tuple[str, int]], window=None) -> Iterable[_Seen]:
        """Stored purchases with these (card, counter) pairs; SQLite (one table) looks at every day."""
        pairs = sorted(pairs)
        for i in range(0, len(pairs), 400):
            query = (select(Tap.card_asn, Tap.card_ttc, Tap.device_id, Tap.device_seq, Tap.amount, Tap.terminal_id,
                            Tap.terminal_seq, Tap.tac, Tap.occurred_at, Tap.epoch)
                     .where(Tap.kind == PURCHASE, tuple_(Tap.card_asn, Tap.card_ttc).in_(pairs[i:i + 400])))
            for row in self.conn.execute(query):
                yield _Seen(*row[:8], _as_utc_seconds(row[8]), row[9])

    def records_by_key(self, keys: set[tuple[str, int, int]], days=(), *, with_day: bool = False,
                       ) -> dict[tuple[str, int, int], dict]:
        """Stored taps by (device_id, epoch, device_seq): their record fields, to tell a resend from a conflict.
        ``days``: the service days the keys' records map to (a key is stored under its record's day, so only those
        days' partitions are read)."""
        keys = sorted(keys)
        columns = [Tap.__table__.c[name] for name in (*_RECORD_FIELDS, *(("service_day",) if with_day else ()))]
        on_days = [Tap.service_day.in_(sorted(days))] if days and None not in days else []
        found = {}
        for i in range(0, len(keys), 400):
            query = select(*columns).where(tuple_(Tap.device_id, Tap.epoch, Tap.device_seq).in_(keys[i:i + 400]),
                                           *on_days)
            for row in self.conn.execute(query).mappings():
                found[(row["device_id"], row["epoch"], row["device_seq"])] = row
        return found

    def insert(self, candidates: list[_Candidate], now: datetime) -> set[tuple[str, int]]:
        if not candidates:
            return set()
        rows = []
        for c in candidates:
            row = {name: getattr(c.record, name) for name in _RECORD_FIELDS}
            row["kind"] = c.record.kind.value
            row["received_at"] = now
            row["service_day"] = c.day
            rows.append(row)
        statement = _insert_statement(self.conn.dialect.name, Tap.__table__, ("device_id", "epoch", "device_seq"))
        return {(r.device_id, r.epoch, r.device_seq) for r in self.conn.execute(statement, rows)}


class _PgCopyStore(_Store):
    """PostgreSQL: advisory locks, look-ups with arrays, COPY into a temporary table then one INSERT ... SELECT."""

    STAGE = "ingest_stage"

    def __init__(self, conn: Connection, copy: bool):
        super().__init__(conn)
        self.copy = copy
        self.pg = conn.connection.driver_connection  # the psycopg connection, inside the same transaction
        from psycopg.types.string import StrDumper

        # COPY writes the kind as its value ('purchase', as the tap table holds it): psycopg dumps an Enum by name.
        self.pg.adapters.register_dumper(RecordKind, StrDumper)

    def lock(self, keys: list[int], shared: list[int] = ()) -> None:
        if keys or shared:
            # Volatile functions in a select list run after the ORDER BY, so the locks are taken in key order: the
            # shared ones (operators' day rules) first, then the devices' and cards'.
            self.pg.execute("SELECT CASE WHEN s THEN pg_advisory_xact_lock_shared(k) ELSE pg_advisory_xact_lock(k) "
                            "END FROM (SELECT k, true AS s FROM unnest(%s::bigint[]) AS k UNION ALL "
                            "SELECT k, false FROM unnest(%s::bigint[]) AS k) AS q ORDER BY s DESC, k",
                            (list(shared), keys))

    def archived(self, candidates):
        """Keys already stored under a day that was detached to the archive schema (backoffice.partitions): their
        resend must not land in tap_default. The parent is locked first (ROW EXCLUSIVE, as the INSERT would), so a
        detach, which needs ACCESS EXCLUSIVE on it, is either committed before this look or waits for our commit."""
        days = sorted({c.day for c in candidates})
        if not days:
            return {}
        self.pg.execute("LOCK TABLE ONLY tap IN ROW EXCLUSIVE MODE")
        names = [partitions.partition_name("tap", d) for d in days]
        tables = [r[0] for r in self.pg.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = ANY(%s)", (partitions.ARCHIVE, names), prepare=False)]
        found: dict = {}
        if not tables:
            return found
        wanted = {c.record.key for c in candidates if partitions.partition_name("tap", c.day) in tables}
        devices, epochs, seqs = (list(x) for x in zip(*sorted(wanted), strict=True))
        columns = ", ".join(f"t.{name}" for name in _RECORD_FIELDS)
        for table in tables:
            cur = self.pg.cursor()
            cur.execute(f"SELECT {columns} FROM {partitions.ARCHIVE}.{table} t JOIN unnest(%s::text[], %s::bigint[], "
                        "%s::bigint[]) AS q(d, e, s) ON t.device_id = q.d AND t.epoch = q.e AND t.device_seq = q.s",
                        (devices, epochs, seqs), prepare=False)
            names_ = [d.name for d in cur.description]
            for row in cur.fetchall():
                mapping = dict(zip(names_, row, strict=True))
                found[(mapping["device_id"], mapping["epoch"], mapping["device_seq"])] = mapping
        if found:
            log.warning("%d record(s) already stored in archived day(s) %s: not stored again", len(found),
                        ", ".join(tables))
        return found

    def on_other_days(self, candidates, window_days):
        """Keys stored under another day within ``window_days`` of the candidates' days: one index range scan per
        device journal and day partition (the keys of a batch are a run of sequences), pruned to those days."""
        if not candidates:
            return {}
        days = {c.record.key: c.day for c in candidates}
        ranges: dict[tuple[str, int], list[int]] = {}
        for device_id, epoch, seq in days:
            r = ranges.setdefault((device_id, epoch), [seq, seq])
            r[0], r[1] = min(r[0], seq), max(r[1], seq)
        (devices, epochs), bounds = zip(*ranges, strict=True), list(ranges.values())
        first = min(days.values()) - timedelta(days=window_days)
        last = max(days.values()) + timedelta(days=window_days)
        columns = ", ".join(f"t.{name}" for name in _RECORD_FIELDS)
        cur = self.pg.cursor()
        cur.execute(f"SELECT {columns}, t.service_day FROM unnest(%s::text[], %s::bigint[], %s::bigint[], "
                    "%s::bigint[]) AS q(d, e, lo, hi) JOIN tap t ON t.device_id = q.d AND t.epoch = q.e AND "
                    "t.device_seq BETWEEN q.lo AND q.hi WHERE t.service_day BETWEEN %s AND %s",
                    (list(devices), list(epochs), [b[0] for b in bounds], [b[1] for b in bounds], first, last),
                    prepare=False)
        names = [d.name for d in cur.description]
        found = {}
        for row in cur.fetchall():
            mapping = dict(zip(names, row, strict=True))
            key = (mapping["device_id"], mapping["epoch"], mapping["device_seq"])
            if key in days and mapping["service_day"] != days[key]:
                found[key] = mapping
        return found

    def purchases_by_card_counter(self, pairs, window=None):
        """Stored purchases with these (card, counter) pairs, on the service days of ``window`` (first, last): the
        day bounds are plain values, so the planner keeps only those days' partitions (and DEFAULT). Over every
        attached day the look-up's cost grows with the days kept attached (bench/ingest.py measures both)."""
        if not pairs:
            return []
        asns, ttcs = zip(*pairs, strict=True)
        first, last = window if window is not None else (date.min, date.max)
        rows = self.pg.execute(
            "SELECT t.card_asn, t.card_ttc, t.device_id, t.device_seq, t.amount, t.terminal_id, t.terminal_seq, "
            "t.tac, t.occurred_at, t.epoch FROM unnest(%s::text[], %s::int[]) AS q(asn, ttc) "
            "JOIN tap t ON t.card_asn = q.asn AND t.card_ttc = q.ttc WHERE t.kind = 'purchase' "
            "AND t.service_day BETWEEN %s AND %s",
            # Never a prepared statement: psycopg prepares after five runs, and a generic plan made while `tap` was
            # small scans the whole table for every batch until the next autoanalyze (the fleet bench saw one
            # worker fall behind at 200 validators; with a plan per call it held 2,000).
            (list(asns), list(ttcs), first, last), prepare=False).fetchall()
        return [_Seen(*row[:8], int(row[8].timestamp()), row[9]) for row in rows]

    def insert(self, candidates, now):
        if not self.copy:
            return super().insert(candidates, now)
        if not candidates:
            return set()
        columns = ", ".join(TAP_COLUMNS)
        # Emptied at every commit (and gone with a rollback); IF NOT EXISTS costs one round trip per transaction.
        self.pg.execute(f"CREATE TEMP TABLE IF NOT EXISTS {self.STAGE} ON COMMIT DELETE ROWS AS "
                        f"SELECT {columns} FROM tap WITH NO DATA")
        with self.pg.cursor() as cur:
            with cur.copy(f"COPY {self.STAGE} ({columns}) FROM STDIN") as copy:
                write = copy.write_row
                for c in candidates:
                    write((*_row_of(c.record), now, c.day))
            # The key includes the partition column (backoffice.partitions says why it still means once).
            cur.execute(f"INSERT INTO tap ({columns}) SELECT {columns} FROM {self.STAGE} "
                        "ORDER BY device_id, epoch, device_seq ON CONFLICT (device_id, epoch, device_seq, service_day) "
                        "DO NOTHING RETURNING device_id, epoch, device_seq")
            return set(cur.fetchall())


_row_of = operator.attrgetter(*_RECORD_FIELDS)


def _store_for(conn: Connection, write: str) -> _Store:
    if conn.dialect.name == "postgresql":
        return _PgCopyStore(conn, copy=write == "copy")
    return _Store(conn)
