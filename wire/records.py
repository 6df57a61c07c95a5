"""What a validator reports: one record per event it saw, the same on its disk, on the air and in the back office.

Every record carries (device_id, epoch, device_seq), the dedupe key. The epoch names the journal that wrote the
record (a random number made when the journal file was created), so a validator whose storage is replaced and
whose sequence starts again at 1 writes new keys, not clashes with its old records; 0 is the epoch of journals
made before journals had one (and of v1/v2 messages without it). A purchase also carries the card's ASN and its
offline counter (TTC) before the debit, the PSAM's terminal number and sequence, and the card's TAC, so the back
office can recompute the TAC with the issuer's key and trust the amount without trusting the bus.

Times are UTC, whole seconds. The card's transaction date and time (which the TAC covers) are this same instant
written as BCD in UTC, so the back office recomputes the TAC from the record alone, without knowing the bus's
time zone.
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import UTC, datetime


class RecordKind(str, enum.Enum):
    PURCHASE = "purchase"  # a fare taken from a rider's e-purse
    SHIFT_OPEN = "shift_open"  # a driver signed in with a driver card
    SHIFT_CLOSE = "shift_close"  # a driver signed out
    DENIED = "denied"  # a deny-listed card was presented and refused
    TICKET_USE = "ticket_use"  # a cardless ticket (QR or pickup code) accepted on the bus (issue 11)


PRESENTED_QR = "qr"  # TICKET_USE: the rider's QR code was scanned
PRESENTED_PICKUP = "pickup"  # TICKET_USE: the driver keyed the rider's 16-digit pickup code
PRESENTED = (PRESENTED_QR, PRESENTED_PICKUP)


@dataclasses.dataclass(frozen=True, slots=True)
class TapRecord:
    device_id: str
    device_seq: int
    kind: RecordKind
    occurred_at: datetime  # UTC, whole seconds
    operator: str
    route: str
    vehicle: str
    driver: str  # the driver's staff number; "" before any shift
    shift_no: int
    card_asn: str = ""  # 20 hex digits
    card_type: int = 0
    card_ttc: int = 0  # the card's offline counter before this purchase
    amount: int = 0  # fen
    balance_after: int = 0  # fen
    terminal_id: str = ""  # 12 hex digits, the PSAM's terminal number
    terminal_seq: int = 0  # the PSAM's transaction sequence
    tac: str = ""  # 8 hex digits
    reason: str = ""  # why a card was refused (DENIED), or why a fare is not the plain fare (transfer, recovery)
    tx_type: int = 0x06  # the card transaction type the TAC covers: 06 purchase, 09 composite (transit record)
    algorithm: int = 0x00  # the card's algorithm: 00 3DES, 04 SM4
    full_fare: int = 0  # fen before card-type and transfer discounts, so concessions can be claimed
    entry_stop: int = 0  # distance-fare routes: where the rider boarded ...
    exit_stop: int = 0  # ... and alighted (0 on entry and on flat routes)
    epoch: int = 0  # the journal that wrote it (see the module docstring); 0: a journal from before epochs
    # TICKET_USE only (0 / "" on every other kind). A QR token names the ticket id (u64); a pickup code only its
    # 10-digit serial (ticket id mod 10^10), which the back office maps to the ticket of this operator.
    ticket_id: int = 0
    ticket_use: int = 0  # which use of the ticket this is on this validator, 1 = its first
    presented: str = ""  # PRESENTED_QR or PRESENTED_PICKUP

    def __post_init__(self):
        if self.occurred_at.tzinfo is None or self.occurred_at.utcoffset().total_seconds() != 0:
            raise ValueError("occurred_at must be an aware UTC datetime")

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.device_id, self.epoch, self.device_seq)


def utc(ts: float) -> datetime:
    """A POSIX timestamp as an aware UTC datetime, truncated to whole seconds."""
    return datetime.fromtimestamp(int(ts), tz=UTC)


def to_plain(record: TapRecord) -> dict:
    """The record as JSON-ready values (time as POSIX seconds, kind as its name)."""
    out = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    out["kind"] = record.kind.value
    out["occurred_at"] = int(record.occurred_at.timestamp())
    return out


def from_plain(values: dict) -> TapRecord:
    """Inverse of :func:`to_plain`, for trusted stores (the validator's own journal); the wire decoder is stricter."""
    values = dict(values)
    values["kind"] = RecordKind(values["kind"])
    values["occurred_at"] = utc(values["occurred_at"])
    return TapRecord(**values)
