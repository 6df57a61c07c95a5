"""A clerk keeps the registry and downloads reports through the API, on SQLite and PostgreSQL.

The story: on 1 February the clerk registers route r7 "7路 老街", vehicle v7, driver d7 and validator dev7 through
the API; on 10 February dev7 sends a shift (sign-in, purchases, sign-out) through real ingest (TACs from the
reference implementation); the day is cleared (a stored run). On 5 March the clerk renames the route and the plate,
takes the validator out, retires the vehicle and the route. February's reports still print February's names, and
every total in the PDFs and spreadsheets equals a sum over the records sent, written here with plain loops.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from io import BytesIO

import pytest
from fastapi.testclient import TestClient
from openpyxl import load_workbook
from pypdf import PdfReader
from reference_crypto import ref_purchase_tac

from backoffice import clearing_runs, registry
from backoffice.db import make_engine, upgrade
from backoffice.ingest import DeviceDirectory, ingest_batch
from backoffice.settle import settle
from backoffice.web.app import create_app
from backoffice.web.auth import Principal, TokenStore
from epurse.keys import TEST_ISSUER_KEYS
from wire import codec, topics
from wire.devicekeys import TEST_DEVICE_MASTER, mac_key
from wire.records import RecordKind, TapRecord

A, B = "oldtown", "newtown"
FEB1 = datetime(2026, 2, 1, 1, 0, tzinfo=UTC)
DAY = date(2026, 2, 10)  # service day: 2026-02-09 19:00 UTC .. 2026-02-10 19:00 UTC (Shanghai, cut-off 03:00)
MAR5 = datetime(2026, 3, 5, 6, 0, tzinfo=UTC)
TERMINAL = "010000000077"
TOKENS = {"t-alice": Principal("alice", "clerk", A), "t-bob": Principal("bob", "clerk", B),
          "t-ops": Principal("dave", "operations"), "t-admin": Principal("erin", "admin")}
RIDES = [  # (minutes after sign-in, card ASN, card type, fen)
    (5, "22220000000000000001", 1, 200), (20, "22220000000000000002", 2, 100),
    (47, "22220000000000000001", 1, 200), (90, "22220000000000000003", 3, 0),
    (130, "22220000000000000004", 1, 200)]


def _h(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(params=["sqlite", "postgresql"])
def app(request):
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=A, name="老城公交 Old Town Bus", at=FEB1 - timedelta(days=40))
        registry.add_operator(conn, code=B, name="新城公交 New Town Bus", at=FEB1 - timedelta(days=40))
        clearing_runs.set_commission_rate(conn, operator=A, rate_bp=60, valid_from=date(2026, 1, 1))
    clock = {"now": FEB1}
    application = create_app(engine, tokens=TokenStore(tokens=TOKENS), clock=lambda: clock["now"], migrate=False)
    with TestClient(application) as client:
        yield client, engine, clock
    engine.dispose()


def _records(start: datetime) -> list[TapRecord]:
    common = {"device_id": "dev7", "operator": A, "route": "r7", "vehicle": "v7", "driver": "d7", "shift_no": 1}
    out = [TapRecord(device_seq=1, kind=RecordKind.SHIFT_OPEN, occurred_at=start, **common)]
    for i, (minutes, asn, card_type, fen) in enumerate(RIDES, start=2):
        when = start + timedelta(minutes=minutes)
        tac = ref_purchase_tac(TEST_ISSUER_KEYS.tac, bytes.fromhex(asn), fen, bytes.fromhex(TERMINAL), 700 + i, when)
        out.append(TapRecord(device_seq=i, kind=RecordKind.PURCHASE, occurred_at=when, card_asn=asn,
                             card_type=card_type, card_ttc=i, amount=fen, balance_after=5000 - fen,
                             terminal_id=TERMINAL, terminal_seq=700 + i, tac=tac.hex(), full_fare=200, **common))
    out.append(TapRecord(device_seq=len(out) + 1, kind=RecordKind.SHIFT_CLOSE,
                         occurred_at=start + timedelta(hours=3), **common))
    return out


def _register_through_the_api(client):
    r = client.post("/api/v1/routes", headers=_h("t-alice"), json={"code": "r7", "name": "7路 老街", "flat_fare": 200})
    assert r.status_code == 201, r.text
    assert r.json()["operator"] == A  # a clerk's own operator without saying so
    assert client.post("/api/v1/vehicles", headers=_h("t-alice"),
                       json={"code": "v7", "plate": "粤A·00007"}).status_code == 201
    assert client.post("/api/v1/drivers", headers=_h("t-alice"), json={
        "staff_no": "d7", "name": "王强", "card_asn": "99990000000000000077"}).status_code == 201
    assert client.post("/api/v1/devices", headers=_h("t-alice"), json={
        "device_id": "dev7", "vehicle": "v7", "terminal_id": TERMINAL}).status_code == 201


def _ride_and_clear(engine) -> list[TapRecord]:
    start = datetime(2026, 2, 10, 0, 30, tzinfo=UTC)  # 08:30 local
    sent = _records(start)
    payload = codec.encode_batch(sent, key=mac_key(TEST_DEVICE_MASTER, "dev7"))
    with engine.begin() as conn:
        result = ingest_batch(conn, topics.taps(A, "dev7"), payload, keys=TEST_ISSUER_KEYS,
                              master=TEST_DEVICE_MASTER, devices=DeviceDirectory(),
                              now=start + timedelta(hours=4))
        assert len(result.ack_seqs) == len(sent), result
        day = settle(conn, operator=A, day=DAY, now=datetime(2026, 2, 11, 1, 0, tzinfo=UTC))
        assert day.run is not None
    return sent


def _pdf_text(content: bytes) -> str:
    assert content.startswith(b"%PDF")
    return "\n".join(p.extract_text() for p in PdfReader(BytesIO(content)).pages)


def _yuan(fen: int) -> str:
    return f"{fen // 100:,}.{fen % 100:02d}"


def test_a_clerk_edits_and_retires_and_old_reports_keep_old_names(app):
    client, engine, clock = app
    _register_through_the_api(client)
    sent = _ride_and_clear(engine)
    gross = sum(r.amount for r in sent if r.kind == RecordKind.PURCHASE)
    fares = sum(1 for r in sent if r.kind == RecordKind.PURCHASE)
    assert gross == 700 and fares == 5

    clock["now"] = MAR5
    r = client.patch("/api/v1/routes/r7", headers=_h("t-alice"), json={"name": "7路 新街", "flat_fare": 250})
    assert r.status_code == 200 and r.json()["changed"] is True, r.text
    assert client.patch("/api/v1/vehicles/v7", headers=_h("t-alice"),
                        json={"plate": "粤A·00077"}).json()["changed"] is True
    # the registry's refusal in its own words: a vehicle that still carries a validator is not retired
    refused = client.post("/api/v1/vehicles/v7/retire", headers=_h("t-alice"), json={"reason": "sold"})
    assert refused.status_code == 409 and "still carries validators dev7" in refused.json()["detail"]["message"]
    assert client.patch("/api/v1/devices/dev7", headers=_h("t-alice"), json={"vehicle": None}).status_code == 200
    assert client.post("/api/v1/vehicles/v7/retire", headers=_h("t-alice"), json={"reason": "sold"}).status_code == 200
    assert client.post("/api/v1/routes/r7/retire", headers=_h("t-alice"), json={"reason": "merged"}).status_code == 200
    again = client.patch("/api/v1/routes/r7", headers=_h("t-alice"), json={"name": "x"})
    assert again.status_code == 409 and "retired" in again.json()["detail"]["message"]
    taken = client.post("/api/v1/routes", headers=_h("t-alice"), json={"code": "r7", "name": "dup", "flat_fare": 1})
    assert taken.status_code == 409

    h = client.get("/api/v1/routes/r7/history", headers=_h("t-alice")).json()
    assert [v["name"] for v in h["versions"]] == ["7路 老街", "7路 新街"]
    assert [v["flat_fare"] for v in h["versions"]] == [200, 250]
    assert h["versions"][0]["valid_to"].startswith("2026-03-05T06:00") and h["versions"][1]["valid_to"]
    assert [(a["action"], a["by"]) for a in h["audit"]] == [("add", "alice"), ("edit", "alice"), ("retire", "alice")]
    assert h["item"]["retired_at"] is not None
    v = client.get("/api/v1/vehicles/v7/history", headers=_h("t-alice")).json()
    assert [x["plate"] for x in v["versions"]] == ["粤A·00007", "粤A·00077"]

    # February's day, as downloaded in March: February's names
    base = f"/api/v1/operators/{A}/reports"
    pdf = client.get(f"{base}/days/{DAY}/settlement?format=pdf", headers=_h("t-alice"))
    assert pdf.status_code == 200 and pdf.headers["x-clearing-run"].startswith("run ")
    text = _pdf_text(pdf.content)
    assert "7路 老街" in text and "新街" not in text and _yuan(gross) in text
    book = load_workbook(BytesIO(client.get(f"{base}/days/{DAY}/settlement?format=xlsx",
                                            headers=_h("t-alice")).content))
    rows = list(book["by_route"].iter_rows(values_only=True))
    head = rows[0]
    body = [dict(zip(head, row)) for row in rows[1:-1]]  # the last row is the totals row
    G, C, N = "总收入(元) Gross (yuan)", "发卡方佣金(元) Issuer commission (yuan)", "运营方净收入(元) Net to operator (yuan)"
    assert [(b["线路 Route"], b["名称 Name"], b["笔数 Taps"], round(b[G] * 100)) for b in body] == [
        ("r7", "7路 老街", fares, gross)]
    with engine.connect() as conn:
        run = clearing_runs.get_run(conn, int(pdf.headers["x-clearing-run"].split()[1]))
    commission = run.totals["day_commission"]
    assert round((body[0][C] + body[0][N]) * 100) == gross and round(body[0][C] * 100) == commission
    csv = client.get(f"{base}/days/{DAY}/settlement?format=csv&table=vehicle", headers=_h("t-alice"))
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.content.decode("utf-8-sig").splitlines()
    assert "粤A·00007" in lines[1] and f",{gross // 100}.{gross % 100:02d}," in lines[1]

    month = client.get(f"{base}/months/2026-02/settlement?format=xlsx", headers=_h("t-alice"))
    sheet = load_workbook(BytesIO(month.content))["by_driver"]
    mrows = list(sheet.iter_rows(values_only=True))
    mbody = [dict(zip(mrows[0], row)) for row in mrows[1:-1]]
    assert [(b["司机 Driver"], b["名称 Name"], round(b[G] * 100)) for b in mbody] == [("d7", "王强", gross)]
    mtext = _pdf_text(client.get(f"{base}/months/2026-02/settlement?format=pdf", headers=_h("t-alice")).content)
    assert "7路 老街" in mtext and _yuan(gross) in mtext

    index = client.get(f"{base}/days/{DAY}", headers=_h("t-alice")).json()
    assert index["run"] == run.id and index["vehicles"] == ["v7"]
    assert [(s["device_id"], s["shift_no"], s["taps"], s["amount"]) for s in index["shifts"]] == [
        ("dev7", 1, fares, gross)]
    shift = _pdf_text(client.get(f"{base}/days/{DAY}/shifts/dev7/1", headers=_h("t-alice")).content)
    by_type: dict[int, int] = {}
    for _m, _asn, card_type, fen in RIDES:
        by_type[card_type] = by_type.get(card_type, 0) + fen
    assert "王强" in shift and "7路 老街" in shift and "粤A·00007" in shift
    assert "In balance" in shift and _yuan(gross) in shift
    assert "adult card" in shift and "card type 1" not in shift  # card types by name
    for fen in by_type.values():
        assert _yuan(fen) in shift
    vehicle = _pdf_text(client.get(f"{base}/days/{DAY}/vehicles/v7", headers=_h("t-alice")).content)
    assert "粤A·00007" in vehicle and "00077" not in vehicle and _yuan(gross) in vehicle


def test_another_operators_clerk_gets_404_and_nothing_changes(app):
    client, engine, clock = app
    _register_through_the_api(client)
    _ride_and_clear(engine)
    clock["now"] = MAR5
    for method, url, body in (
            ("patch", "/api/v1/routes/r7", {"name": "x"}), ("post", "/api/v1/routes/r7/retire", {}),
            ("patch", "/api/v1/vehicles/v7", {"plate": "x"}), ("post", "/api/v1/drivers/d7/retire", {}),
            ("patch", "/api/v1/devices/dev7", {"vehicle": None}), ("get", "/api/v1/routes/r7/history", None),
            ("post", "/api/v1/routes", {"operator": A, "code": "r8", "name": "x", "flat_fare": 1})):
        kw = {} if body is None else {"json": body}
        r = getattr(client, method)(url, headers=_h("t-bob"), **kw)
        assert r.status_code == 404, (url, r.status_code, r.text)
    for url in (f"/days/{DAY}", f"/days/{DAY}/settlement", "/months/2026-02/settlement",
                f"/days/{DAY}/shifts/dev7/1", f"/days/{DAY}/vehicles/v7"):
        assert client.get(f"/api/v1/operators/{A}/reports{url}", headers=_h("t-bob")).status_code == 404, url
        assert client.get(f"/api/v1/operators/{A}/reports{url}", headers=_h("t-admin")).status_code == 200, url
    # bob's own operator has no shift dev7/1 and no vehicle v7
    assert client.get(f"/api/v1/operators/{B}/reports/days/{DAY}/shifts/dev7/1",
                      headers=_h("t-bob")).status_code == 404
    assert client.get(f"/api/v1/operators/{B}/reports/days/{DAY}/vehicles/v7", headers=_h("t-bob")).status_code == 404
    h = client.get("/api/v1/routes/r7/history", headers=_h("t-ops")).json()
    assert [a["action"] for a in h["audit"]] == ["add"] and h["item"]["name"] == "7路 老街"
    # operations may write any operator's registry, signed with their name
    r = client.post("/api/v1/routes", headers=_h("t-ops"), json={"operator": B, "code": "n1", "name": "1路",
                                                                 "flat_fare": 100})
    assert r.status_code == 201 and r.json()["operator"] == B
    with engine.connect() as conn:
        assert registry.audit_lines(conn, operator=B, kind="route", key="n1")[0]["by"] == "dave"


def test_a_get_never_clears_a_day(app):
    client, engine, clock = app
    _register_through_the_api(client)
    start = datetime(2026, 2, 12, 0, 30, tzinfo=UTC)
    sent = _records(start)
    with engine.begin() as conn:
        ingest_batch(conn, topics.taps(A, "dev7"), codec.encode_batch(sent, key=mac_key(TEST_DEVICE_MASTER, "dev7")),
                     keys=TEST_ISSUER_KEYS, master=TEST_DEVICE_MASTER, devices=DeviceDirectory(), now=start)
    clock["now"] = MAR5
    r = client.get(f"/api/v1/operators/{A}/reports/days/2026-02-12/settlement?format=xlsx", headers=_h("t-alice"))
    assert r.status_code == 200 and r.headers["x-clearing-run"].startswith("provisional")
    sheet = load_workbook(BytesIO(r.content))["by_route"]
    rows = list(sheet.iter_rows(values_only=True))
    assert round(dict(zip(rows[0], rows[1]))["总收入(元) Gross (yuan)"] * 100) == sum(
        x.amount for x in sent if x.kind == RecordKind.PURCHASE)
    with engine.connect() as conn:
        assert settle(conn, operator=A, day=date(2026, 2, 12), now=MAR5, close_day=False).run is None


# ------------------------------------------------------------------------------------------------ the pages
def _csrf(page: str) -> str:
    import re

    return re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)


def test_the_clerks_forms_and_report_page(app):
    client, engine, clock = app
    client.cookies.clear()
    assert client.post("/login", data={"token": "t-alice", "next": "/manage/routes"},
                       follow_redirects=False).status_code == 303
    page = client.get("/manage/routes").text
    assert "资料维护" in page and "/reports" in page  # nav entries
    csrf = _csrf(page)
    forged = client.post("/manage/routes", data={"key": "r9", "name": "9路", "fare": "2.50"})
    assert forged.status_code == 400  # no CSRF field: not from our page
    r = client.post("/manage/routes", data={"csrf": csrf, "key": "r9", "name": "9路 旧名", "fare": "2.50"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/manage/routes/r9?done=added"
    bad = client.post("/manage/routes", data={"csrf": csrf, "key": "r8", "name": "8路", "fare": "2.555"})
    assert bad.status_code == 409 and "最多两位小数" in bad.text  # the page's language (Chinese)
    clock["now"] = FEB1 + timedelta(days=3)
    r = client.post("/manage/routes/r9", data={"csrf": csrf, "name": "9路 新名", "fare": ""}, follow_redirects=False)
    assert r.status_code == 303
    item = client.get("/manage/routes/r9").text
    assert "9路 旧名" in item and "9路 新名" in item and "¥2.50" in item and item.count("<td>alice</td>") == 2
    with engine.connect() as conn:
        assert [v["flat_fare"] for v in registry.history(conn, kind="route", key="r9")] == [250, 250]
    # a refusal in the registry's words on the same page
    client.post("/manage/vehicles", data={"csrf": csrf, "key": "v9", "plate": "粤A·9"})
    client.post("/manage/devices", data={"csrf": csrf, "key": "dev9", "vehicle": "v9", "terminal_id": "0" * 11 + "9"})
    refused = client.post("/manage/vehicles/v9/retire", data={"csrf": csrf, "reason": "sold"})
    assert refused.status_code == 409 and "仍装有车载机 dev9" in refused.text  # the page's language (Chinese)
    client.post("/manage/devices/dev9", data={"csrf": csrf, "vehicle": "-"})
    assert client.post("/manage/vehicles/v9/retire", data={"csrf": csrf, "reason": "sold"},
                       follow_redirects=False).status_code == 303
    assert "已停用" in client.get("/manage/vehicles/v9").text
    # another operator's entry is not there for alice
    client.post("/login", data={"token": "t-bob", "next": "/"})
    assert client.get("/manage/routes/r9").status_code == 404
    assert client.post("/manage/routes/r9", data={"csrf": _csrf(client.get("/manage/routes").text),
                                                  "name": "x"}).status_code == 404

    client.post("/login", data={"token": "t-alice", "next": "/"})
    _register_through_the_api(client)
    sent = _ride_and_clear(engine)
    gross = sum(x.amount for x in sent if x.kind == RecordKind.PURCHASE)
    page = client.get(f"/reports?day={DAY}").text
    assert "清分批次" in page and "dev7" in page and f"¥{_yuan(gross)}" in page  # one language: "clearing run" in zh
    import re

    links = dict(re.findall(r'id="(day-xlsx|month-pdf)" href="([^"]+)"', page))
    book = load_workbook(BytesIO(client.get(links["day-xlsx"].replace("&amp;", "&")).content))
    rows = list(book["by_vehicle"].iter_rows(values_only=True))
    assert round(dict(zip(rows[0], rows[1]))["总收入(元) Gross (yuan)"] * 100) == gross
    assert _yuan(gross) in _pdf_text(client.get(links["month-pdf"].replace("&amp;", "&")).content)
    shift_link = re.search(r'href="(/reports/shift[^"]+)"', page).group(1).replace("&amp;", "&")
    assert "In balance" in _pdf_text(client.get(shift_link).content)


# ------------------------------------------------------------------------------------------------ the commands
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_registry_commands_add_edit_and_retire(backend, request, monkeypatch, capsys):
    from farebox.cli import main

    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_schema_url")
    monkeypatch.setenv("FAREBOX_DATABASE_URL", url)
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=A, name="老城公交")

    def run(*argv):
        code = main(["registry", *argv])
        out = capsys.readouterr()
        return code, out.out + out.err

    assert run("add-route", "--operator", A, "--code", "r1", "--name", "1路", "--fare", "2.00", "--by", "kim") == (
        0, "route r1 added (flat fare ¥2.00)\n")  # typed in yuan, as a person types it
    assert run("edit-route", "--code", "r1", "--name", "1路 新", "--by", "kim")[0] == 0
    assert run("edit-route", "--code", "r1", "--name", "1路 新", "--by", "kim") == (
        0, "route r1 unchanged (nothing differs)\n")
    assert run("add-vehicle", "--operator", A, "--code", "v1", "--plate", "粤A·1", "--by", "kim")[0] == 0
    assert run("edit-vehicle", "--code", "v1", "--plate", "粤A·2", "--by", "kim")[0] == 0
    assert run("add-driver", "--operator", A, "--staff-no", "d1", "--name", "李", "--card-asn", "9" * 20,
               "--by", "kim")[0] == 0
    assert run("edit-driver", "--staff-no", "d1", "--card-asn", "8" * 20, "--by", "kim")[0] == 0
    assert run("add-device", "--operator", A, "--device-id", "x1", "--terminal-id", "0" * 12, "--vehicle", "v1",
               "--by", "kim")[0] == 0
    code, text = run("retire-vehicle", "--code", "v1", "--by", "kim", "--reason", "sold")
    assert code == 2 and "still carries validators x1" in text  # the registry's words, no traceback
    assert run("edit-device", "--device-id", "x1", "--no-vehicle", "--by", "kim")[0] == 0
    for kind, option, key in (("vehicle", "--code", "v1"), ("route", "--code", "r1"), ("driver", "--staff-no", "d1"),
                              ("device", "--device-id", "x1")):
        assert run(f"retire-{kind}", option, key, "--by", "kim") == (0, f"{kind} {key} retired\n")
    code, text = run("add-route", "--operator", A, "--code", "r1", "--name", "dup", "--fare", "1", "--by", "kim")
    assert code == 2 and "taken already" in text
    with engine.connect() as conn:
        assert [v["name"] for v in registry.history(conn, kind="route", key="r1")] == ["1路", "1路 新"]
        assert [v["plate"] for v in registry.history(conn, kind="vehicle", key="v1")] == ["粤A·1", "粤A·2"]
        lines = registry.audit_lines(conn, operator=A)
        assert {a["by"] for a in lines if a["kind"] != "operator"} == {"kim"}
        assert [a["action"] for a in lines if a["kind"] == "route"] == ["add", "edit", "retire"]
    engine.dispose()
