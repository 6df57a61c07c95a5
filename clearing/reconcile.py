"""Reconciliation: three comparisons, each giving ``Discrepancy`` items a clerk can act on.

- ``reconcile_shifts``: validator shifts against the taps received. The validator's own shift summary is not
  uploaded yet, so a shift's totals are built from its received records (SHIFT_OPEN .. SHIFT_CLOSE, by device
  sequence), and a shift is out of balance when records are missing inside it (a gap in the device sequence), when
  its sign-in or sign-out was never received, or (once a declared summary is handed in) when the declared taps or
  amount differ from what arrived. A gap can also be a purchase the validator cancelled (a grey record whose card
  was never debited is never uploaded); the clerk accepts those, which is why a gap is flagged, not corrected.
- ``reconcile_issuer``: the card issuer's daily file (``read_issuer_file``) against farebox's stored purchases,
  matched by the card transaction (card ASN, card TTC): missing on either side, amount differs, terminal / TAC
  differ, duplicate on either side.
- ``reconcile_payments``: the payment platform's records against over-the-air top-up orders, by order id, over
  plain records (lists of dicts or frames), so the top-up service can feed it.

``suggested`` on each item is the signed fen that would bring the operator's settlement to the other side's figure
(+ the operator is owed more); the clerk may adjust by it, by another amount, accept as is, or dispute.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SHIFT_OPEN, SHIFT_CLOSE, PURCHASE = "shift_open", "shift_close", "purchase"


@dataclass(frozen=True)
class Discrepancy:
    kind: str  # shift | issuer | payment
    ref: str  # what it is about: "device/shift_no", "card_asn/card_ttc", an order id
    problem: str
    ours: int | None  # fen on farebox's side (None: nothing there)
    theirs: int | None  # fen on the other side
    detail: str

    @property
    def suggested(self) -> int:
        return (self.theirs or 0) - (self.ours or 0)


# ---------------------------------------------------------------------------------------------------- shifts
SHIFT_COLUMNS = ("device_id", "device_seq", "kind", "shift_no", "amount")


def shift_totals(taps: pd.DataFrame) -> pd.DataFrame:
    """One row per (device_id, shift_no > 0): first/last sequence, records, purchases, amount (fen), missing
    (sequence numbers inside the shift that never arrived), opened / closed (its sign-in / sign-out arrived).

    With an ``epoch`` column the unit is a journal, (device_id, epoch): a validator whose storage was replaced
    starts its sequences and shift numbers again under a new epoch, and its old and new shift 1 are two shifts
    (the output then has an ``epoch`` column too). ``taps`` are unique by (device_id, [epoch,] device_seq) (the
    tap table's key), so a shift's record count is its number of distinct sequences. Frames already in (device_id, device_seq) order (the loader asks for it) are reduced in
    one pass over contiguous runs; others are sorted first.
    """
    missing_cols = [c for c in SHIFT_COLUMNS if c not in taps.columns]
    if missing_cols:
        raise ValueError(f"tap frame is missing column(s) {missing_cols}; shift totals need {list(SHIFT_COLUMNS)}")
    shift_no = taps["shift_no"].to_numpy(dtype=np.int64)
    inshift = shift_no > 0  # 0: a record with nobody signed in (e.g. a refused card), in no shift
    kind = taps["kind"]
    if isinstance(kind.dtype, pd.CategoricalDtype):  # compare once per category, not once per row
        cats = np.asarray(kind.cat.categories, dtype=object)
        codes = kind.cat.codes.to_numpy()
        is_open, is_close, is_purchase = (np.append(cats == k, False)[codes]
                                          for k in (SHIFT_OPEN, SHIFT_CLOSE, PURCHASE))
    else:
        kind = kind.to_numpy()
        is_open, is_close, is_purchase = kind == SHIFT_OPEN, kind == SHIFT_CLOSE, kind == PURCHASE
    device = taps["device_id"]
    by_journal = "epoch" in taps.columns
    if by_journal:  # one label per journal, split again below (US, \x1f: no device id holds it; pandas drops NUL)
        device = device.astype(str) + "\x1f" + taps["epoch"].astype("int64").astype(str)
    if isinstance(device.dtype, pd.CategoricalDtype):
        dev, dev_labels = device.cat.codes.to_numpy().astype(np.int64), np.asarray(device.cat.categories, object)
    else:
        dev, dev_labels = pd.factorize(device.astype(str), sort=True)
        dev, dev_labels = dev.astype(np.int64), np.asarray(dev_labels, dtype=object)
    seq = taps["device_seq"].to_numpy(dtype=np.int64)
    amount = np.where(is_purchase, taps["amount"].to_numpy(dtype=np.int64), 0)

    idx = np.flatnonzero(inshift)
    dev, seq, shift_no = dev[idx], seq[idx], shift_no[idx]
    step_dev, step_seq = np.diff(dev), np.diff(seq)
    if not ((step_dev > 0) | ((step_dev == 0) & (step_seq > 0))).all():
        order = np.lexsort((seq, dev))
        idx, dev, seq, shift_no = idx[order], dev[order], seq[order], shift_no[order]
    change = np.r_[True, (dev[1:] != dev[:-1]) | (shift_no[1:] != shift_no[:-1])] if len(idx) else np.zeros(0, bool)
    starts = np.flatnonzero(change)
    if len(starts):
        seg = pd.DataFrame({
            "dev": dev[starts], "shift_no": shift_no[starts],
            "first_seq": np.minimum.reduceat(seq, starts), "last_seq": np.maximum.reduceat(seq, starts),
            "records": np.diff(np.r_[starts, len(idx)]),
            "purchases": np.add.reduceat(is_purchase[idx].astype(np.int64), starts),
            "amount": np.add.reduceat(amount[idx], starts),  # int64: exact
            "opened": np.maximum.reduceat(is_open[idx], starts), "closed": np.maximum.reduceat(is_close[idx], starts),
        })
    else:
        seg = pd.DataFrame({c: pd.Series([], dtype="int64") for c in
                            ("dev", "shift_no", "first_seq", "last_seq", "records", "purchases", "amount")})
        seg["opened"] = seg["closed"] = pd.Series([], dtype=bool)
    if seg.duplicated(["dev", "shift_no"]).any():  # a shift interleaved with another: fold its runs together
        seg = seg.groupby(["dev", "shift_no"], as_index=False, sort=True).agg(
            first_seq=("first_seq", "min"), last_seq=("last_seq", "max"), records=("records", "sum"),
            purchases=("purchases", "sum"), amount=("amount", "sum"), opened=("opened", "max"),
            closed=("closed", "max"))
    labels = dev_labels[seg["dev"].to_numpy()].astype(str) if len(seg) else np.array([], dtype=str)
    out = pd.DataFrame({"device_id": [lab.split("\x1f")[0] for lab in labels]})
    if by_journal:
        out["epoch"] = np.array([int(lab.split("\x1f")[1]) for lab in labels], dtype=np.int64)
    out["shift_no"] = seg["shift_no"].to_numpy()
    for col in ("first_seq", "last_seq", "records", "purchases", "amount"):
        out[col] = seg[col].to_numpy(dtype=np.int64)
    out["missing"] = out["last_seq"] - out["first_seq"] + 1 - out["records"]
    out["opened"] = seg["opened"].to_numpy(dtype=bool)
    out["closed"] = seg["closed"].to_numpy(dtype=bool)
    out["shift_no"] = out["shift_no"].astype("int64")
    keys = ["device_id", "epoch", "shift_no"] if by_journal else ["device_id", "shift_no"]
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


def _shift_ref(row) -> str:
    """"device/shift" as clerks read it; a later journal of the device (epoch not 0) is named too."""
    epoch = getattr(row, "epoch", 0)
    return f"{row.device_id}/{row.shift_no}" if not epoch else f"{row.device_id}/journal {epoch:x}/{row.shift_no}"


def reconcile_shifts(taps: pd.DataFrame, declared: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list]:
    """(shift totals, discrepancies). ``declared``: the validators' own shift summaries when they come (device_id,
    shift_no, taps, amount); without it only what the received records say of themselves is checked."""
    totals = shift_totals(taps)
    items: list[Discrepancy] = []
    bad = totals[(totals["missing"] > 0) | ~totals["opened"] | ~totals["closed"]]
    for row in bad.itertuples(index=False):
        ref = _shift_ref(row)
        seqs = f"seq {row.first_seq}..{row.last_seq}, {row.records} records, {row.purchases} purchases"
        if row.missing:
            items.append(Discrepancy("shift", ref, "records_missing", int(row.amount), None,
                                     f"{row.missing} record(s) missing inside the shift ({seqs})"))
        if not row.opened:
            items.append(Discrepancy("shift", ref, "no_sign_in", int(row.amount), None,
                                     f"the driver's sign-in was not received ({seqs})"))
        if not row.closed:
            items.append(Discrepancy("shift", ref, "not_closed", int(row.amount), None,
                                     f"no sign-out received: still open, or its last records are missing ({seqs})"))
    if declared is not None and len(declared):
        # The validators' summaries name (device, shift); a shift of each journal is added up under that name.
        got = totals.groupby(["device_id", "shift_no"]).agg(purchases=("purchases", "sum"), amount=("amount", "sum"))
        for row in declared.itertuples(index=False):
            key = (str(row.device_id), int(row.shift_no))
            ref = f"{key[0]}/{key[1]}"
            if key not in got.index:
                items.append(Discrepancy("shift", ref, "shift_not_received", None, int(row.amount),
                                         f"the validator reports {row.taps} purchases, none received"))
                continue
            have = got.loc[key]
            if int(have["purchases"]) != int(row.taps) or int(have["amount"]) != int(row.amount):
                items.append(Discrepancy(
                    "shift", ref, "out_of_balance", int(have["amount"]), int(row.amount),
                    f"validator: {row.taps} purchases / {row.amount} fen; received: {have['purchases']} / "
                    f"{have['amount']} fen"))
    return totals, items


# ---------------------------------------------------------------------------------------------- issuer file
ISSUER_COLUMNS = ("card_asn", "card_ttc", "amount", "terminal_id", "terminal_seq", "tac", "occurred_at")
ISSUER_FILE_DOC = """The card issuer's daily file: CSV, UTF-8, comma-separated, one header line with exactly these
columns (any order), one row per purchase the issuer cleared:

| column | meaning |
|---|---|
| card_asn | the card's application serial number, 20 hex digits |
| card_ttc | the card's offline transaction counter before the purchase (decimal) |
| amount | the amount debited, integer fen |
| terminal_id | the PSAM's terminal number, 12 hex digits |
| terminal_seq | the PSAM's transaction sequence (decimal) |
| tac | the card's TAC, 8 hex digits |
| occurred_at | the card transaction's time, ISO 8601 in UTC (e.g. 2026-03-05T07:30:00Z) |
"""


def read_issuer_file(source: str | Path | io.TextIOBase) -> pd.DataFrame:
    """The issuer's CSV (``ISSUER_FILE_DOC``) as a frame; a clear error for a missing column or a bad amount."""
    if isinstance(source, str) and "\n" in source:
        source = io.StringIO(source)
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    missing = [c for c in ISSUER_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"issuer file lacks column(s) {missing}; expected {list(ISSUER_COLUMNS)}")
    for col, (low, high) in _ISSUER_RANGES.items():
        bad = ~frame[col].str.fullmatch(r"-?[0-9]{1,10}")
        if not bad.any():
            frame[col] = frame[col].astype("int64")
            bad = (frame[col] < low) | (frame[col] > high)  # a card counter is 2 bytes, an amount 4, ...
        if bad.any():
            line = int(np.flatnonzero(bad.to_numpy())[0]) + 2  # header is line 1
            raise ValueError(f"issuer file line {line}: {col} must be a whole number from {low} to {high}, got "
                             f"{str(frame[col][bad].iloc[0])[:30]!r}")
    for col, digits in (("card_asn", 20), ("terminal_id", 12), ("tac", 8)):
        frame[col] = frame[col].str.strip().str.upper()
        bad = ~frame[col].str.fullmatch(f"[0-9A-F]{{{digits}}}")
        if bad.any():
            line = int(np.flatnonzero(bad.to_numpy())[0]) + 2
            raise ValueError(f"issuer file line {line}: {col} must be {digits} hex digits, got "
                             f"{frame[col][bad].iloc[0][:40]!r}")
    try:
        frame["occurred_at"] = pd.to_datetime(frame["occurred_at"], utc=True, format="ISO8601")
    except (ValueError, OverflowError) as e:
        raise ValueError(f"issuer file: occurred_at must be ISO 8601 times in UTC ({str(e)[:200]})") from None
    return frame[list(ISSUER_COLUMNS)]


# What each number of the issuer's file may be: checked before anything is stored or summed
_ISSUER_RANGES = {"card_ttc": (0, 0xFFFF), "amount": (-0xFFFFFFFF, 0xFFFFFFFF), "terminal_seq": (0, 0xFFFFFFFF)}


def write_issuer_file(frame: pd.DataFrame) -> str:
    """A frame with ``ISSUER_COLUMNS`` as the issuer's CSV (for tests and the simulator)."""
    out = frame[list(ISSUER_COLUMNS)].copy()
    out["occurred_at"] = pd.to_datetime(out["occurred_at"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    return out.to_csv(index=False, lineterminator="\n")


def _by_card_tx(frame: pd.DataFrame) -> dict[tuple[str, int], list[dict]]:
    out: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for rec in frame[list(ISSUER_COLUMNS)].to_dict("records"):
        out[(str(rec["card_asn"]).upper(), int(rec["card_ttc"]))].append(rec)
    return out


def reconcile_issuer(ours: pd.DataFrame, theirs: pd.DataFrame) -> list[Discrepancy]:
    """Farebox's purchases (``ours``) against the issuer's file (``theirs``), both with ``ISSUER_COLUMNS``."""
    mine, file = _by_card_tx(ours), _by_card_tx(theirs)
    items: list[Discrepancy] = []
    for key in sorted(mine.keys() | file.keys()):
        a, b = mine.get(key, []), file.get(key, [])
        ref = f"{key[0]}/{key[1]}"
        ours_amt = sum(int(r["amount"]) for r in a) if a else None
        theirs_amt = sum(int(r["amount"]) for r in b) if b else None
        if len(a) > 1:
            items.append(Discrepancy("issuer", ref, "duplicate_in_farebox", ours_amt, theirs_amt,
                                     f"{len(a)} stored purchases share this card transaction"))
        if len(b) > 1:
            items.append(Discrepancy("issuer", ref, "duplicate_in_file", ours_amt, theirs_amt,
                                     f"the issuer's file lists this card transaction {len(b)} times"))
        if not a:
            items.append(Discrepancy("issuer", ref, "missing_in_farebox", None, theirs_amt,
                                     f"in the issuer's file (terminal {b[0]['terminal_id']} seq "
                                     f"{b[0]['terminal_seq']}), not among farebox's purchases"))
        elif not b:
            items.append(Discrepancy("issuer", ref, "missing_in_file", ours_amt, None,
                                     f"stored by farebox (terminal {a[0]['terminal_id']} seq "
                                     f"{a[0]['terminal_seq']}), not in the issuer's file"))
        elif len(a) == 1 and len(b) == 1:
            x, y = a[0], b[0]
            if int(x["amount"]) != int(y["amount"]):
                items.append(Discrepancy("issuer", ref, "amount_differs", ours_amt, theirs_amt,
                                         f"farebox {x['amount']} fen, issuer {y['amount']} fen"))
            diff = [c for c in ("terminal_id", "terminal_seq", "tac")
                    if str(x[c]).upper() != str(y[c]).upper()]
            if diff:
                items.append(Discrepancy("issuer", ref, "record_differs", ours_amt, theirs_amt,
                                         "differs in " + ", ".join(f"{c} ({x[c]} / {y[c]})" for c in diff)))
    return items


# ------------------------------------------------------------------------------------------- payment platform
def _records(records) -> list[dict]:
    if isinstance(records, pd.DataFrame):
        return records.to_dict("records")
    return [dict(r) for r in records]


def reconcile_payments(platform, topups) -> list[Discrepancy]:
    """The payment platform's records against farebox's over-the-air top-up orders, both matched by ``order_id``.

    ``platform``: dicts with order_id, amount (fen) and status (``paid`` or ``refunded``).
    ``topups``: dicts with order_id, amount (fen) and state (``loaded`` when CREDIT FOR LOAD's TAC came back;
    anything else, e.g. ``pending`` / ``failed`` / ``refunded``, means the card was not loaded).
    Here "ours" is what farebox loaded onto cards and "theirs" what the platform collected.
    """
    plat, mine = _records(platform), _records(topups)
    p_count, m_count = Counter(str(r["order_id"]) for r in plat), Counter(str(r["order_id"]) for r in mine)
    p_by = {str(r["order_id"]): r for r in plat}
    m_by = {str(r["order_id"]): r for r in mine}
    items: list[Discrepancy] = []
    for oid in sorted(p_by.keys() | m_by.keys()):
        p, m = p_by.get(oid), m_by.get(oid)
        paid = int(p["amount"]) if p is not None and p["status"] == "paid" else None
        loaded = int(m["amount"]) if m is not None and m["state"] == "loaded" else None
        if p_count[oid] > 1:
            items.append(Discrepancy("payment", oid, "duplicate_on_platform", loaded, paid,
                                     f"the platform lists order {oid} {p_count[oid]} times"))
        if m_count[oid] > 1:
            items.append(Discrepancy("payment", oid, "duplicate_in_farebox", loaded, paid,
                                     f"farebox has {m_count[oid]} top-ups for order {oid}"))
        if p is None:
            items.append(Discrepancy("payment", oid, "missing_on_platform", loaded, None,
                                     f"top-up {m['state']} in farebox, the platform has no such order"))
        elif m is None:
            if paid is not None:
                items.append(Discrepancy("payment", oid, "paid_not_loaded", None, paid,
                                         "paid on the platform, no top-up in farebox"))
        elif paid is not None and loaded is None:
            items.append(Discrepancy("payment", oid, "paid_not_loaded", None, paid,
                                     f"paid, top-up {m['state']}: retry the load or refund the rider"))
        elif paid is None and loaded is not None:
            items.append(Discrepancy("payment", oid, "loaded_not_paid", loaded, None,
                                     f"loaded onto the card, platform status {p['status']}"))
        elif paid is not None and paid != loaded:
            items.append(Discrepancy("payment", oid, "amount_differs", loaded, paid,
                                     f"loaded {loaded} fen, paid {paid} fen"))
    return items
