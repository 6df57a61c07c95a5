"""backoffice.web.messages: the Chinese a page shows for what domain code says in English.

The English is made by the domain code itself (registry refusals on a SQLite registry, ingest's quarantine reasons
as worded there, the alarms' texts), so a change of wording that the patterns no longer know fails here rather than
leaving English on a Chinese page unseen. The Chinese is written here by hand.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from backoffice import registry
from backoffice.alarms import classify
from backoffice.db import make_engine, upgrade
from backoffice.web.messages import chinese, zh_en

AT = datetime(2026, 12, 2, 0, 0, tzinfo=UTC)


@pytest.fixture
def conn(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'bo.db'}")
    upgrade(engine)
    with engine.begin() as c:
        registry.add_operator(c, code="op1", name="One", by="t", at=AT)
        registry.add_vehicle(c, code="v1", operator="op1", plate="沪A-1", by="t", at=AT)
        registry.add_device(c, device_id="d1", operator="op1", vehicle="v1", terminal_id="010000000001", by="t",
                            at=AT)
        yield c
    engine.dispose()


def refusal(fn) -> str:
    with pytest.raises(registry.RegistryError) as e:
        fn()
    return str(e.value)


def test_registry_refusals_made_by_the_registry_read_in_chinese(conn):
    cases = [
        (lambda: registry.retire_vehicle(conn, code="v1", by="t", at=AT, reason="sold"),
         "车辆“v1”仍装有车载机 d1：请先移走或停用"),
        (lambda: registry.add_route(conn, code="r1", operator="op1", name="1路", flat_fare=0, by="t", at=AT),
         "线路 r1 的单一票价须为正整数（分），收到 0"),
        (lambda: registry.add_operator(conn, code="op1", name="Again", by="t", at=AT),
         "公司“op1”已登记（farebox registry operators 可列出）"),
        (lambda: registry.add_operator(conn, code="op2", name="Two", timezone="Mars/Base", by="t", at=AT),
         "时区“Mars/Base”无法识别：请填写 IANA 时区名，例如 Asia/Shanghai"),
    ]
    for fn, want in cases:
        english = refusal(fn)
        assert chinese(english) == want, english
        assert zh_en(english) == (want, english)  # the English as the API says it


def test_quarantine_reasons_and_alarm_texts():
    assert chinese("TAC does not verify with the issuer's key: record altered or not from a genuine card") == \
        "TAC 用发卡方密钥验证不通过：记录被改动，或并非来自真卡"
    assert chinese("quarantine row 7 cannot be released: terminal 010000000009 is not the PSAM registered for this "
                   "device (010000000001) at 2026-12-02 07:44:00Z; reject it instead") == \
        "隔离记录 7 无法放行：终端 010000000009 不是该车载机在 2026-12-02 07:44:00Z 登记的 PSAM（应为 010000000001）；请改为驳回"
    # the validator's own words (validator.uplink), as the alarms table keeps them
    for text, want in (("3 grey purchases since 2026-12-02 07:44Z", "自 2026-12-02 07:44Z 起 3 笔未完成扣款"),
                       ("journal 85% full", "日志已用 85%"), ("journal full", "日志已满"),
                       ("denylist stale", "黑名单过期"), ("2 records set aside (cannot encode)", "2 条记录无法编码，已另存待上传")):
        assert classify(text)[0] != "device", text  # a text the alarms know
        assert chinese(text) == want


def test_a_message_no_pattern_knows_stays_as_written():
    assert chinese("something new went wrong") is None
    assert zh_en("something new went wrong") == ("something new went wrong", "something new went wrong")
