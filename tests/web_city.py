"""A small two-company city for the web tests, put in through the real use cases: backoffice.registry for the
registry and cards, backoffice.ingest.ingest_batch with v2 batches MAC'd by each device's key (TACs from the
reference implementation) for taps and quarantine, backoffice.devices.record_status with signed status messages.

The clock is fixed: NOW is 14:00 in Shanghai on 2026-03-05, so the current service day (cut-off 03:00 local) is
2026-03-05 and runs from 2026-03-04 19:00 UTC. Taps fall on both sides of that cut-off and on the day before.
``seed`` returns every record it sent, so tests sum them with their own loops.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from reference_crypto import ref_purchase_tac

from backoffice import registry
from backoffice.devices import record_status
from backoffice.ingest import DeviceDirectory, ingest_batch
from epurse.keys import TEST_ISSUER_KEYS
from wire import codec, topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.records import RecordKind, TapRecord
from wire.status import Status, encode_status

NOW = datetime(2026, 3, 5, 6, 0, 0, tzinfo=UTC)
A, B = "citybus", "metrobus"
A_NAME, B_NAME = "城市公交 City Bus", "地铁巴士 Metro Bus"
DEVICES = {  # device -> (operator, vehicle, route, driver, terminal)
    "cb_001": (A, "cv1", "c1", "cd1", "010000000001"),
    "cb_002": (A, "cv2", "c2", "cd1", "010000000003"),
    "mb_001": (B, "mv1", "m9", "md1", "010000000002"),
}
SHARED_CARD = "11110000000000000001"  # rides with both companies
CARDS = [SHARED_CARD, "11110000000000000002", "11110000000000000003", "11110000000000000004"]


@dataclasses.dataclass
class City:
    sent: list[TapRecord]  # every record sent to ingest (stored ones and quarantined ones)
    quarantined: list[TapRecord]  # the ones with a forged TAC
    unknown_device_batches: int


def _purchase(device: str, seq: int, when: datetime, asn: str, ttc: int, amount: int, balance: int,
              forged: bool = False, card_type: int = 1) -> TapRecord:
    operator, vehicle, route, driver, terminal = DEVICES[device]
    tseq = 5000 + seq
    tac = ref_purchase_tac(TEST_ISSUER_KEYS.tac, bytes.fromhex(asn), amount, bytes.fromhex(terminal), tseq, when)
    return TapRecord(device_id=device, device_seq=seq, kind=RecordKind.PURCHASE, occurred_at=when,
                     operator=operator, route=route, vehicle=vehicle, driver=driver, shift_no=1, card_asn=asn,
                     card_type=card_type, card_ttc=ttc, amount=amount, balance_after=balance,
                     terminal_id=terminal, terminal_seq=tseq, tac="00000000" if forged else tac.hex(),
                     full_fare=amount)


def _send(conn, device: str, records: list[TapRecord], topic: str | None = None):
    operator = DEVICES[device][0] if device in DEVICES else A
    payload = codec.encode_batch(records, key=mac_key(TEST_DEVICE_MASTER, device))
    return ingest_batch(conn, topic or topics.taps(operator, device), payload, keys=TEST_ISSUER_KEYS,
                        master=TEST_DEVICE_MASTER, devices=DeviceDirectory())


def seed(engine, now: datetime = NOW) -> City:
    """The city, with taps and statuses placed relative to ``now`` (the e2e test uses the real clock)."""
    with engine.begin() as conn:
        registry.add_operator(conn, code=A, name=A_NAME)
        registry.add_operator(conn, code=B, name=B_NAME)
        registry.add_route(conn, code="c1", operator=A, name="1路 火车站—大学城", flat_fare=200)
        registry.add_route(conn, code="c2", operator=A, name="2路 环线", flat_fare=150)
        registry.add_route(conn, code="m9", operator=B, name="9路 机场快线", flat_fare=300)
        registry.add_vehicle(conn, code="cv1", operator=A, plate="粤A·10001")
        registry.add_vehicle(conn, code="cv2", operator=A, plate="粤A·10002")
        registry.add_vehicle(conn, code="mv1", operator=B, plate="粤B·20001")
        registry.add_driver(conn, staff_no="cd1", operator=A, name="张伟", card_asn="99990000000000000001")
        registry.add_driver(conn, staff_no="md1", operator=B, name="李娜", card_asn="99990000000000000002")
        for device, (operator, vehicle, _r, _d, terminal) in DEVICES.items():
            registry.add_device(conn, device_id=device, operator=operator, vehicle=vehicle, terminal_id=terminal)
        registry.add_cards(conn, [{"asn": CARDS[0], "card_type": 1}, {"asn": CARDS[1], "card_type": 2},
                                  {"asn": CARDS[2], "card_type": 3}, {"asn": CARDS[3], "card_type": 1,
                                                                      "status": "lost"}])
    now = now.replace(microsecond=0)  # records carry whole seconds (the TAC covers them)
    # the start of now's service day: 03:00 Shanghai (UTC+8, no daylight saving) = 19:00 UTC the day before
    local = now + timedelta(hours=8) - timedelta(hours=3)
    cutoff = datetime(local.year, local.month, local.day, tzinfo=UTC) - timedelta(hours=5)
    plan = {  # device -> [(when, asn, amount, card_type)]
        "cb_001": [(cutoff - timedelta(minutes=30), CARDS[0], 200, 1),  # 02:30 local: yesterday's service day
                   (cutoff - timedelta(hours=10), CARDS[1], 100, 2),  # yesterday daytime
                   (cutoff + timedelta(minutes=1), CARDS[0], 200, 1),  # 03:01 local: today
                   (cutoff + timedelta(hours=5), CARDS[1], 100, 2),
                   (now - timedelta(minutes=30), CARDS[2], 0, 3),  # a free elderly ride still counts as a fare
                   (now - timedelta(minutes=10), CARDS[0], 200, 1)],
        "cb_002": [(cutoff + timedelta(hours=2), CARDS[1], 75, 2), (now - timedelta(hours=1), CARDS[2], 150, 3)],
        "mb_001": [(cutoff + timedelta(hours=3), CARDS[0], 300, 1), (now - timedelta(minutes=5), CARDS[0], 300, 1),
                   (cutoff - timedelta(hours=2), CARDS[2], 300, 3)],
    }
    balance = {asn: 10_000 for asn in CARDS}
    ttc = {asn: 0 for asn in CARDS}
    sent, quarantined = [], []
    every = sorted((when, device, asn, amount, ct) for device, taps in plan.items()
                   for when, asn, amount, ct in taps)
    seqs = {device: 0 for device in DEVICES}
    for when, device, asn, amount, ct in every:
        seqs[device] += 1
        ttc[asn] += 1
        balance[asn] -= amount
        sent.append(_purchase(device, seqs[device], when, asn, ttc[asn], amount, balance[asn], card_type=ct))
    for device in ("cb_001", "cb_001", "mb_001"):  # forged TACs: quarantined, never counted
        seqs[device] += 1
        bad = _purchase(device, seqs[device], now - timedelta(minutes=3), CARDS[1], 900 + seqs[device], 500, 1,
                        forged=True)
        sent.append(bad)
        quarantined.append(bad)
    shift = TapRecord(device_id="cb_001", device_seq=100, kind=RecordKind.SHIFT_OPEN,
                      occurred_at=cutoff + timedelta(minutes=1), operator=A, route="c1", vehicle="cv1",
                      driver="cd1", shift_no=1)
    sent.append(shift)
    with engine.begin() as conn:
        for device in DEVICES:
            records = [r for r in sent if r.device_id == device]
            result = _send(conn, device, records)
            assert result.ack_seqs, result
        # a device nobody registered: quarantined, seen by operations and admins only
        stray = dataclasses.replace(sent[0], device_id="zz_999")
        _send(conn, "zz_999", [stray], topic=topics.taps(A, "zz_999"))
        # status: cb_001 heard a minute ago, mb_001 silent for 20 minutes (stale), cb_002 never heard
        for device, at in (("cb_001", now - timedelta(minutes=1)), ("mb_001", now - timedelta(minutes=20))):
            status = Status(kind="birth", device_id=device, at=at, software="2.4.1", params_version=3,
                            denylist_version=1, backlog=2, psam=DEVICES[device][4])
            payload = encode_status(status, key=mac_key(TEST_DEVICE_MASTER, device))
            record_status(conn, topic=topics.status(DEVICES[device][0], device), payload=payload,
                          master=TEST_DEVICE_MASTER, now=now)
    return City(sent=sent, quarantined=quarantined, unknown_device_batches=1)
