"""A PSAM swap and the quarantine's way back (issue 9, hole 6), on SQLite and PostgreSQL.

A running ingest (one long-lived :class:`Ingest`, as IngestConsumer keeps) learns a PSAM swap the moment the
registry has it: the new PSAM's taps are stored, late uploads signed by the old PSAM from before the swap are
stored too (checked against the registry's history at the record's time), the old PSAM after the swap and a forged
terminal number are quarantined. Quarantined records are released through every ingest check again, stored once,
or stay quarantined with the reason found now, or are rejected; each decision is audited. Two releases of one row
at the same moment (two threads, PostgreSQL) store it once.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from reference_crypto import ref_purchase_tac
from sqlalchemy import func, select

from backoffice import quarantine, registry
from backoffice.cards.audit import trail
from backoffice.db import make_engine, upgrade
from backoffice.ingest import DeviceDirectory, Ingest
from backoffice.models import Quarantine, Tap
from epurse.keys import TEST_ISSUER_KEYS
from wire import codec, topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.records import RecordKind, TapRecord

OP, DEV = "op_q", "dev_q1"
OLD_PSAM, NEW_PSAM, FORGED_PSAM = "010000000001", "010000000002", "0100000000ff"
REGISTERED = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
SWAP = datetime(2026, 3, 5, 9, 0, tzinfo=UTC)
ASN = "01020304050607080910"


def purchase(seq: int, terminal: str, at: datetime, amount: int = 200) -> TapRecord:
    tseq = 1000 + seq
    return TapRecord(device_id=DEV, device_seq=seq, kind=RecordKind.PURCHASE, occurred_at=at, operator=OP,
                     route="r1", vehicle="b1", driver="d1", shift_no=1, card_asn=ASN, card_type=1, card_ttc=seq,
                     amount=amount, balance_after=9000 - seq * amount, terminal_id=terminal, terminal_seq=tseq,
                     tac=ref_purchase_tac(TEST_ISSUER_KEYS.tac, bytes.fromhex(ASN), amount, bytes.fromhex(terminal),
                                          tseq, at).hex())


def message(*records: TapRecord) -> tuple[str, bytes]:
    return topics.taps(OP, DEV), codec.encode_batch(list(records), key=mac_key(TEST_DEVICE_MASTER, DEV))


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    url = f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Quarantine Bus", at=REGISTERED)
        registry.add_device(conn, device_id=DEV, operator=OP, vehicle=None, terminal_id=OLD_PSAM, at=REGISTERED)
        registry.add_cards(conn, [{"asn": ASN, "card_type": 1}])
    yield engine
    engine.dispose()


def new_ingest() -> Ingest:
    return Ingest(keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER, devices=DeviceDirectory(), write="insert")


def run(engine, ingest, *records):
    with engine.begin() as conn:
        return ingest.messages(conn, [message(*records)])[0]


def swap(engine, at=SWAP):
    with engine.begin() as conn:
        assert registry.edit_device(conn, device_id=DEV, by="clerk_li", terminal_id=NEW_PSAM, at=at)


def stored_seqs(engine) -> set[int]:
    with engine.connect() as conn:
        return set(conn.execute(select(Tap.device_seq)).scalars())


def open_rows(engine) -> dict[int, int]:
    """device_seq -> quarantine id of the open rows."""
    with engine.connect() as conn:
        return dict(conn.execute(select(Quarantine.device_seq, Quarantine.id).where(Quarantine.status == "open")).all())


def test_a_running_ingest_follows_a_psam_swap_at_once_and_judges_each_tap_by_its_time(engine):
    ingest = new_ingest()  # one ingest across the swap, as a running IngestConsumer keeps it
    before = SWAP - timedelta(hours=1)
    assert run(engine, ingest, purchase(1, OLD_PSAM, before)).stored == 1  # the directory now holds the device

    swap(engine)
    after = SWAP + timedelta(minutes=5)
    fresh = run(engine, ingest, purchase(2, NEW_PSAM, after))
    assert (fresh.stored, fresh.quarantined) == (1, 0), open_rows(engine)  # the new PSAM, stored at once
    late = run(engine, ingest, purchase(3, OLD_PSAM, before + timedelta(minutes=30)))
    assert late.stored == 1  # a late upload from before the swap, signed by the PSAM of its time
    stale = run(engine, ingest, purchase(4, OLD_PSAM, after + timedelta(minutes=1)),
                purchase(5, FORGED_PSAM, after + timedelta(minutes=2)))
    assert (stale.stored, stale.quarantined) == (0, 2)  # the old PSAM after the swap; a made-up terminal number
    assert stored_seqs(engine) == {1, 2, 3}
    with engine.connect() as conn:
        reasons = dict(conn.execute(select(Quarantine.device_seq, Quarantine.reason)).all())
    assert f"not the PSAM registered for this device ({NEW_PSAM})" in reasons[4]
    assert f"terminal {FORGED_PSAM} is not the PSAM registered" in reasons[5]

    # an ingest started after the swap (a restart) reads the same history: the late upload is still genuine
    restarted = run(engine, new_ingest(), purchase(6, OLD_PSAM, before + timedelta(minutes=40)),
                    purchase(7, NEW_PSAM, after + timedelta(minutes=3)))
    assert restarted.stored == 2 and stored_seqs(engine) == {1, 2, 3, 6, 7}


def test_the_directory_drops_what_it_holds_when_the_registry_changes():
    """Pure directory logic on a clock of our own: the registry's stamp is read at most every refresh_seconds."""
    reads = []

    class Conn:  # answers the stamp query and the device queries as a database would, counting them
        def __init__(self):
            self.stamp = (1, 1)
            self.terminal = OLD_PSAM

        def execute(self, statement):
            text = str(statement)
            reads.append(text)
            outer = self

            class Result:
                def one(self):
                    return outer.stamp

                def first(self):
                    return type("Row", (), {"operator": OP, "terminal_id": outer.terminal})()

                def __iter__(self):
                    return iter([type("V", (), {"valid_from": REGISTERED, "terminal_id": outer.terminal})()])

            return Result()

    clock = [0.0]
    directory = DeviceDirectory(refresh_seconds=1.0, clock=lambda: clock[0])
    conn = Conn()
    assert directory.get(conn, DEV).terminal_at(SWAP) == OLD_PSAM
    n = len(reads)
    conn.terminal, conn.stamp = NEW_PSAM, (2, 2)
    clock[0] = 0.5
    assert directory.get(conn, DEV).terminal_at(SWAP) == OLD_PSAM and len(reads) == n  # within the second: memory
    clock[0] = 1.5
    assert directory.get(conn, DEV).terminal_at(SWAP) == NEW_PSAM  # the stamp moved: read again


def test_release_after_the_registry_is_corrected_stores_once_and_a_forgery_stays(engine):
    # The mechanic put the new PSAM in at 09:00; the clerk types the swap in at noon. Meanwhile the bus's taps,
    # signed by the new PSAM, are quarantined (the registry still said the old one) and acknowledged.
    ingest = new_ingest()
    taps = [purchase(s, NEW_PSAM, SWAP + timedelta(minutes=10 * s)) for s in (1, 2, 3)]
    forged = purchase(4, FORGED_PSAM, SWAP + timedelta(minutes=45))
    result = run(engine, ingest, *taps, forged)
    assert (result.stored, result.quarantined, sorted(result.ack_seqs)) == (0, 4, [1, 2, 3, 4])
    rows = open_rows(engine)
    assert set(rows) == {1, 2, 3, 4}

    swap(engine, at=SWAP)  # the clerk records the swap at the time it was made
    now = SWAP + timedelta(hours=3)
    with engine.begin() as conn:
        first = quarantine.release(conn, rows[1], by="ops_wang", why="PSAM swapped at 09:00, registry corrected",
                                   ingest=ingest, now=now)
    assert first.released and first.stored == 1 and first.item.tap_id is not None
    assert first.item.resolved_by == "ops_wang" and first.item.resolved_at == now
    with engine.begin() as conn, pytest.raises(quarantine.QuarantineError, match="released already"):
        quarantine.release(conn, rows[1], by="ops_zhao", why="again", ingest=ingest, now=now)
    for seq in (2, 3):
        with engine.begin() as conn:
            assert quarantine.release(conn, rows[seq], by="ops_wang", why="PSAM swap", ingest=ingest, now=now).released

    with engine.begin() as conn:
        still = quarantine.release(conn, rows[4], by="ops_wang", why="try", ingest=ingest, now=now)
    assert not still.released and still.item.status == "open"
    assert f"terminal {FORGED_PSAM} is not the PSAM registered" in still.still_failing
    assert still.item.recheck_reason == still.still_failing
    with engine.begin() as conn:
        rejected = quarantine.reject(conn, rows[4], by="ops_wang", why="no such PSAM was ever issued", now=now)
    assert rejected.status == "rejected"

    # Money: what the card lost in these three genuine taps is what is stored now, once each.
    with engine.connect() as conn:
        stored = conn.execute(select(func.count(), func.sum(Tap.amount))).one()
        assert tuple(stored) == (3, sum(t.amount for t in taps))
        assert conn.execute(select(func.count()).select_from(Quarantine)).scalar_one() == 4  # nothing deleted
        actions = [(a.action, a.who, a.amount) for a in trail(conn, asn=ASN)]
    assert actions.count(("quarantine_release", "ops_wang", 200)) == 3
    assert ("quarantine_recheck", "ops_wang", 200) in actions and ("quarantine_reject", "ops_wang", 200) in actions


def test_a_whole_message_kept_in_quarantine_is_checked_again_mac_and_all(engine):
    ingest = new_ingest()
    topic, payload = message(purchase(1, OLD_PSAM, SWAP))
    forged = payload[:-1] + bytes([payload[-1] ^ 1])
    with engine.begin() as conn:
        assert ingest.messages(conn, [(topic, forged)])[0].refused
    (row,) = open_rows(engine).values()
    with engine.begin() as conn:
        again = quarantine.release(conn, row, by="ops_wang", why="looks fine to me", ingest=ingest)
    assert not again.released and "MAC does not verify" in again.still_failing
    assert stored_seqs(engine) == set()


def test_an_unsigned_record_is_released_only_as_unsigned(engine):
    ingest = new_ingest()
    record = purchase(1, OLD_PSAM, SWAP)
    with engine.begin() as conn:
        assert ingest.messages(conn, [(topics.taps(OP, DEV), codec.encode_batch_json([record]))])[0].refused
    (row,) = open_rows(engine).values()
    with engine.begin() as conn:
        again = quarantine.release(conn, row, by="ops_wang", why="validator upgraded", ingest=ingest)
    assert not again.released and "unsigned" in again.still_failing  # not slipped through as a MAC'd batch
    window = Ingest(keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER, accept_unsigned=True, write="insert")
    with engine.begin() as conn:
        assert quarantine.release(conn, row, by="ops_wang", why="migration window open", ingest=window).released
    assert stored_seqs(engine) == {1}


def test_two_releases_of_one_row_at_once_store_it_once(pg_schema_url):
    engine = make_engine(pg_schema_url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Quarantine Bus", at=REGISTERED)
        registry.add_device(conn, device_id=DEV, operator=OP, vehicle=None, terminal_id=OLD_PSAM, at=REGISTERED)
        registry.add_cards(conn, [{"asn": ASN, "card_type": 1}])
    ingest = new_ingest()
    run(engine, ingest, purchase(1, NEW_PSAM, SWAP + timedelta(minutes=1)))
    swap(engine)
    (row,) = open_rows(engine).values()

    gate = threading.Barrier(2)
    outcomes: list = []

    def reviewer(name):
        own = new_ingest()  # each reviewer its own process's ingest, as two API workers would have
        with engine.connect() as conn:
            trans = conn.begin()
            gate.wait()
            try:
                done = quarantine.release(conn, row, by=name, why="PSAM swap", ingest=own)
                trans.commit()
                outcomes.append(("released", done.stored))
            except quarantine.QuarantineError as e:
                trans.rollback()
                outcomes.append(("refused", str(e)))

    threads = [threading.Thread(target=reviewer, args=(f"ops_{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(o[0] for o in outcomes) == ["refused", "released"], outcomes
    assert [o for o in outcomes if o[0] == "released"][0][1] == 1
    assert "released already" in [o for o in outcomes if o[0] == "refused"][0][1]
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Tap)).scalar_one() == 1
        assert [a.action for a in trail(conn, asn=ASN)].count("quarantine_release") == 1
    engine.dispose()


def test_the_review_page_shows_the_record_and_its_psams_and_releases_it(engine):
    from fastapi.testclient import TestClient

    from backoffice.web.api.quarantine import configure_quarantine
    from backoffice.web.app import create_app
    from backoffice.web.auth import Principal, TokenStore

    ingest = new_ingest()
    run(engine, ingest, purchase(1, NEW_PSAM, SWAP + timedelta(minutes=1)))
    (row,) = open_rows(engine).values()
    tokens = TokenStore(tokens={"t-ops": Principal("ops_wang", "operations"), "t-clerk": Principal("li", "clerk", OP)})
    app = create_app(engine, tokens=tokens, migrate=False)
    configure_quarantine(app, ingest=ingest)
    # English pages: the reasons and refusals read as ingest and the review wrote them (test_language checks Chinese)
    ops = {"Authorization": "Bearer t-ops", "Accept-Language": "en"}
    clerk = {"Authorization": "Bearer t-clerk", "Accept-Language": "en"}
    with TestClient(app) as client:
        listed = client.get("/quarantine", headers=clerk)
        assert listed.status_code == 200 and f'href="/quarantine/{row}"' in listed.text
        page = client.get(f"/quarantine/{row}", headers=clerk)
        assert page.status_code == 200 and OLD_PSAM in page.text and "not the PSAM registered" in page.text
        assert 'id="release-form"' not in page.text  # a clerk looks; operations decide
        assert client.post(f"/quarantine/{row}/release", data={"why": "swap"}, headers=clerk).status_code == 403
        swap(engine)
        done = client.post(f"/quarantine/{row}/release", data={"why": "PSAM swap typed in late"}, headers=ops,
                           follow_redirects=False)
        assert done.status_code == 303 and done.headers["location"].endswith("done=released")
        page = client.get(f"/quarantine/{row}", headers=ops)
        assert 'data-status="released">released' in page.text and "ops_wang" in page.text and NEW_PSAM in page.text
        twice = client.post(f"/quarantine/{row}/release", data={"why": "again"}, headers=ops)
        assert twice.status_code == 409 and "released already" in twice.text
        detail = client.get(f"/api/v1/quarantine/{row}", headers=clerk).json()
        assert detail["status"] == "released" and detail["record"]["terminal_id"] == NEW_PSAM
        assert [p["terminal_id"] for p in detail["psams"]] == [OLD_PSAM, NEW_PSAM]
    assert stored_seqs(engine) == {1}


def test_rows_quarantined_before_the_review_existed_are_recovered(tmp_path):
    """Yesterday's ingest (stale cache) quarantined genuine purchases and acknowledged them; revision 0013 works out
    from ingest's own reason texts which rows came from a MAC'd batch, and a release recovers them."""
    from alembic import command

    from backoffice.db import alembic_config

    engine = make_engine(f"sqlite:///{tmp_path}/old.db")
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "2026_11_22_0010")  # the schema before this review
    record, unsigned = purchase(1, NEW_PSAM, SWAP + timedelta(minutes=1)), purchase(2, OLD_PSAM, SWAP)
    q = Quarantine.__table__
    with engine.begin() as conn:
        conn.execute(q.insert().values(
            received_at=SWAP, topic=topics.taps(OP, DEV), device_id=DEV, device_seq=1, payload=codec.encode_batch_json(
                [record]), reason=f"terminal {NEW_PSAM} is not the PSAM registered for this device ({OLD_PSAM})"))
        conn.execute(q.insert().values(
            received_at=SWAP, topic=topics.taps(OP, DEV), device_id=DEV, device_seq=2,
            payload=codec.encode_batch_json([unsigned]), reason="unsigned v1 batch refused: this back office ..."))
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Quarantine Bus", at=REGISTERED)
        registry.add_device(conn, device_id=DEV, operator=OP, vehicle=None, terminal_id=OLD_PSAM, at=REGISTERED)
        registry.edit_device(conn, device_id=DEV, by="clerk_li", terminal_id=NEW_PSAM, at=SWAP)
    with engine.connect() as conn:
        kept = dict(conn.execute(select(Quarantine.device_seq, Quarantine.signed)).all())
    assert kept == {1: True, 2: False}
    rows = open_rows(engine)
    with engine.begin() as conn:
        assert quarantine.release(conn, rows[1], by="ops_wang", why="stale cache before the fix",
                                  ingest=new_ingest()).released
        assert not quarantine.release(conn, rows[2], by="ops_wang", why="try", ingest=new_ingest()).released
    assert stored_seqs(engine) == {1}
    engine.dispose()
