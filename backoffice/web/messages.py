"""Chinese for the English messages domain code writes, for the pages only.

The registry's refusals (backoffice.registry.RegistryError and the registry API's own words), the reasons ingest
quarantines a record for (backoffice.ingest, backoffice.tickets.uses), the quarantine review's refusals
(backoffice.quarantine) and the validators' alarm texts (validator.uplink, backoffice.alarms) are written once, in
English, for the API, the CLI and the logs; they stay so. A page shows them through the ``pick`` filter
(backoffice.web.lang), which asks :func:`zh_en` for the pair: the Chinese page gets the Chinese below, the English
page the text unchanged.

Each entry is an English pattern matching a whole message and its Chinese, in which ``{name}`` is the named group;
a group whose name ends in ``_msg`` is itself a message (translated the same way, or kept as written). A message no
pattern knows is None: the page keeps the English, which says what to do.
"""

from __future__ import annotations

import functools
import re

# the registry's kinds as its messages name them
KINDS = {"operator": "公司", "route": "线路", "vehicle": "车辆", "driver": "司机", "device": "车载机",
         "fleet": "车队", "validator": "车载机"}
_Q = r"""['"](?P<{}>.*?)['"]"""  # a value written with !r: 'x' (or "x" when it holds a quote)


def _q(name: str) -> str:
    return _Q.format(name)


_KIND = r"(?P<kind>operator|route|vehicle|driver|device|fleet)"
_WHEN = r"(?P<{}>\d{{4}}-\d\d-\d\d[ T][\d:.+]+Z?)"


def _w(name: str) -> str:
    return _WHEN.format(name)


_RULES: list[tuple[str, str]] = [
    # ------------------------------------------------------------------------------------------- registry
    (rf"{_KIND} {_q('key')} is not registered", "{kind}“{key}”未登记"),
    (rf"{_KIND} {_q('key')} was retired at {_w('at')}: a retired entry is kept for history and cannot be changed; "
     r"register a new one", "{kind}“{key}”已于 {at} 停用：停用的资料只留作历史，不能再修改；请另行登记"),
    (rf"{_KIND} {_q('key')}: a change at {_w('at')} would come before the version in force since {_w('since')}; "
     r"date it at or after that", "{kind}“{key}”：{at} 的修改早于自 {since} 起生效的版本；请定在该时间或之后"),
    (r"say who makes the change: by=<user name>", "请注明修改人：by=<用户名>"),
    (r"(?P<what_msg>.+) must be a positive whole number of fen, got (?P<value>.+)", "{what}须为正整数（分），收到 {value}"),
    (r"(?P<what_msg>.+) must be a non-negative whole number of fen, got (?P<value>.+)",
     "{what}须为非负整数（分），收到 {value}"),
    (r"route (?P<code>\S+): the flat fare", "线路 {code} 的单一票价"),
    (r"transfer discount", "换乘优惠"),
    (rf"time zone {_q('tz')} is not known: give an IANA name such as Asia/Shanghai",
     "时区“{tz}”无法识别：请填写 IANA 时区名，例如 Asia/Shanghai"),
    (r"cut-off hour must be a whole hour 0 to 23 \(local time the service day ends\), got (?P<value>.+)",
     "日切时间须为 0 到 23 的整点（运营日结束的当地时间），收到 {value}"),
    (r"give the operator's name", "请填写公司名称"),
    (rf"operator {_q('code')} is registered already \(farebox registry operators lists them\)",
     "公司“{code}”已登记（farebox registry operators 可列出）"),
    (r"card type (?P<type>\S+) pays (?P<percent>.+) percent of the fare: must be 0 to 100",
     "卡类 {type} 付票价的 {percent}%：须在 0 到 100 之间"),
    (r"transfer window must be whole minutes >= 0, got (?P<value>.+)", "换乘时限须为不小于 0 的整数分钟，收到 {value}"),
    (rf"operator {_q('code')} still has (?P<listed>.+): retire them first", "公司“{code}”仍有 {listed}：请先停用"),
    (r"valid_from must be a service day \(a date\), got (?P<value>.+)", "生效日须为运营日（日期），收到 {value}"),
    (rf"operator {_q('code')}: service day (?P<day>\S+) is cleared already at the rate then in force; a new rate can "
     r"start on (?P<next>\S+) at the earliest", "公司“{code}”：运营日 {day} 已按当时费率清分；新费率最早从 {next} 起"),
    (rf"fleet {_q('fleet')} is not registered: add it with `farebox registry add-fleet`",
     "车队“{fleet}”未登记：请先用 `farebox registry add-fleet` 添加"),
    (rf"fleet {_q('fleet')} belongs to operator {_q('owner')}, vehicle {_q('vehicle')} to {_q('other')}",
     "车队“{fleet}”属于公司“{owner}”，车辆“{vehicle}”属于“{other}”"),
    (r"direction (?P<d>\S+): a route runs in direction 0 \(outbound\) or 1 \(inbound\)",
     "方向 {d}：线路方向只能是 0（去程）或 1（回程）"),
    (rf"stops (?P<stops>.+) are not registered for operator {_q('op')}: add them with set_stop \(or import the GTFS "
     r"feed\)", "站点 {stops} 未在公司“{op}”登记：请先添加站点（或导入 GTFS）"),
    (rf"route {_q('route')}: distance stages must be \(up to stops, fare\) going up in stops, got (?P<ups>.+)",
     "线路“{route}”：分段票价须为（站数上限, 票价），站数逐段增加，收到 {ups}"),
    (r"route (?P<code>\S+): give a flat fare or distance stages, not both",
     "线路 {code}：请填写单一票价或分段票价，不能两者都填"),
    (rf"vehicle {_q('code')} still carries validators (?P<list>.+): move them with move_device or retire them first",
     "车辆“{code}”仍装有车载机 {list}：请先移走或停用"),
    (rf"vehicle {_q('vehicle')} is retired: validator (?P<device>\S+) cannot be mounted in it",
     "车辆“{vehicle}”已停用：车载机 {device} 不能装在上面"),
    (rf"vehicle {_q('vehicle')} belongs to operator {_q('owner')}, not {_q('op')}",
     "车辆“{vehicle}”属于公司“{owner}”，不属于“{op}”"),
    (rf"operator {_q('op')} was not registered \(or was retired\) at {_w('at')}", "公司“{op}”在 {at} 未登记（或已停用）"),
    (r"refused by the database: the code is taken already or names something that is not registered "
     r"\((?P<why>[^)]*)\)", "数据库拒绝：编号已被占用，或引用了未登记的资料（{why}）"),
    (rf"operator {_q('op')} not found", "公司“{op}”不存在"),
    (rf"{_KIND} {_q('key')} not found", "{kind}“{key}”不存在"),
    (r"say which operator the entry belongs to \(operator\)", "请选择所属公司"),
    (r"stage (?P<part>.+): write 'up to stops:fare in yuan', e\.g\. 10:2\.00",
     "分段 {part}：请写成“站数上限:票价（元）”，例如 10:2.00"),
    (r"(?P<raw>.+) is not an amount in yuan: type e\.g\. 50 or 2\.00", "{raw} 不是以元计的金额：请输入例如 50 或 2.00"),
    (r"(?P<raw>.+): yuan take at most two decimals \(fen\), e\.g\. 2\.50", "{raw}：金额最多两位小数（分），例如 2.50"),
    (r"(?P<raw>.+): an amount here cannot be negative", "{raw}：此处金额不能为负数"),
    # ------------------------------------------------------------------------------------------- ingest: quarantine
    (r"not a tap topic: (?P<e>.+)", "不是刷卡记录的主题：{e}"),
    (r"message of (?P<n>[\d,]+) bytes, more than the (?P<max>[\d,]+) any valid batch has: refused unread, its first "
     r"(?P<kept>[\d,]+) bytes kept", "报文 {n} 字节，超过任何有效批次的上限 {max}：未读即拒收，保留前 {kept} 字节"),
    (r"forged or misrouted: the message MAC does not verify with the key of device (?P<d>\S+) \((?P<e>.*)\)",
     "伪造或错投：报文 MAC 用车载机 {d} 的密钥验证不通过（{e}）"),
    (r"undecodable batch: (?P<e>.+)", "无法解码的批次：{e}"),
    (rf"batch says device {_q('d')} of {_q('op')} but came on the topic of {_q('td')} of {_q('top')}",
     "批次自称公司“{op}”的车载机“{d}”，却来自公司“{top}”车载机“{td}”的主题"),
    (r"unsigned v(?P<v>\d+) batch refused: this back office takes only MAC'd batches \(start ingest with "
     r"--accept-unsigned while old validators are upgraded\)",
     "拒收未签名的 v{v} 批次：本后台只收带报文 MAC 的批次（旧车载机升级期间可用 --accept-unsigned 启动入库）"),
    (r"device (?P<d>\S+) is not registered: add it with `farebox device add` and re-send",
     "车载机 {d} 未登记：请用 `farebox device add` 登记后重发"),
    (rf"device (?P<d>\S+) belongs to operator {_q('owner')}, not {_q('op')}", "车载机 {d} 属于公司“{owner}”，不属于“{op}”"),
    (r"set aside by the validator \(could not encode it\): (?P<why>.+)", "车载机无法编码而另存：{why}"),
    (rf"terminal (?P<t>\S+) is not the PSAM registered for this device \((?P<expected>[^)]*)\) at {_w('at')}",
     "终端 {t} 不是该车载机在 {at} 登记的 PSAM（应为 {expected}）"),
    (r"transaction type (?P<t>\S+) is not a purchase \(06\) or a composite purchase \(09\)",
     "交易类型 {t} 既不是消费（06）也不是复合消费（09）"),
    (r"algorithm (?P<a>\S+) is neither 3DES \(00\) nor SM4 \(04\)", "算法 {a} 既不是 3DES（00）也不是 SM4（04）"),
    (r"TAC does not verify with the issuer's key: record altered or not from a genuine card",
     "TAC 用发卡方密钥验证不通过：记录被改动，或并非来自真卡"),
    (r"fraud: card (?P<card>\S+) counter (?P<ttc>\d+) already stored from device (?P<d>\S+) seq (?P<s>\d+) with "
     r"different (?P<fields>.+)", "欺诈：卡 {card} 计数器 {ttc} 已由车载机 {d} 序号 {s} 入库，而本条的 {fields} 不同"),
    (r"copy of card (?P<card>\S+) transaction (?P<ttc>\d+) already stored from device (?P<d>\S+) seq (?P<s>\d+): "
     r"not counted twice", "卡 {card} 交易 {ttc} 的副本：已由车载机 {d} 序号 {s} 入库，不重复计算"),
    (r"conflict: device (?P<d>\S+) journal (?P<e>\d+) seq (?P<s>\d+) is already stored with different "
     r"(?P<fields>.+); not a duplicate \(a journal replaced without a new epoch, or a forgery\): review it",
     "冲突：车载机 {d} 日志代次 {e} 序号 {s} 已入库，而本条的 {fields} 不同；不是重复上传（日志被替换却未换代次，或是伪造）：请复核"),
    (r"conflict: device (?P<d>\S+) journal (?P<e>\d+) seq (?P<s>\d+) is already stored as a ticket use with "
     r"different (?P<fields>.+); not a duplicate: review it",
     "冲突：车载机 {d} 日志代次 {e} 序号 {s} 已作为乘车码使用入库，而本条的 {fields} 不同；不是重复上传：请复核"),
    (rf"ticket use presented as {_q('how')}, neither qr nor pickup", "乘车码出示方式“{how}”既不是二维码也不是取票码"),
    (r"pickup serial (?P<n>\d+) is no ticket of operator (?P<op>\S+) here: not counted, review it",
     "取票序号 {n} 不是本后台公司 {op} 的车票：未计入，请复核"),
    (r"ticket (?P<n>\d+) is no ticket of operator (?P<op>\S+) here: not counted, review it",
     "车票 {n} 不是本后台公司 {op} 的车票：未计入，请复核"),
    (rf"used at {_w('at')}, outside its validity {_w('a')} to {_w('b')}", "使用于 {at}，超出有效期 {a} 至 {b}"),
    (r"ticket (?P<n>\d+) was refunded: shown after its money went back", "车票 {n} 已退款：退款后仍被出示"),
    (r"ticket (?P<n>\d+) has no use left \((?P<made>\d+) of (?P<allowed>\d+) made\): shown again, on another bus or "
     r"after it was used up", "车票 {n} 已无可用次数（已用 {made} / {allowed}）：在别的车上或用完后再次出示"),
    # ------------------------------------------------------------------------------------------- quarantine review
    (r"quarantine row (?P<n>\d+) not found", "没有隔离记录 {n}"),
    (r"quarantine row (?P<n>\d+) was (?P<status_msg>released|rejected) already, by (?P<by>.+) at (?P<at>\S+ \S+): "
     r"nothing to do", "隔离记录 {n} 已由 {by} 于 {at} {status}，无需再办"),
    (r"released", "放行"),
    (r"rejected", "驳回"),
    (r"say who decides: by=<user name>", "请注明处理人：by=<用户名>"),
    (r"say why \(e\.g\. .*\): it goes to the audit trail", "请填写原因（例如“12月3日更换 PSAM，登记已更正”）：原因记入审计"),
    (r"quarantine row (?P<n>\d+) cannot be released: its topic is not a device's \((?P<e>.*)\); reject it instead",
     "隔离记录 {n} 无法放行：其主题不属于任何车载机（{e}）；请改为驳回"),
    (r"quarantine row (?P<n>\d+) cannot be released: (?P<problem_msg>.+); reject it instead",
     "隔离记录 {n} 无法放行：{problem}；请改为驳回"),
    # ------------------------------------------------------------------------------------------- alarms
    (r"journal full", "日志已满"),
    (r"journal (?P<p>\d+)% full", "日志已用 {p}%"),
    (r"(?P<n>\d+) records? set aside \(cannot encode\)", "{n} 条记录无法编码，已另存待上传"),
    (rf"(?P<n>\d+) grey purchases? since {_w('at')}", "自 {at} 起 {n} 笔未完成扣款"),
    (r"denylist stale", "黑名单过期"),
    (r"(?P<n>\d+) quarantined records? (?:awaits|await) review", "{n} 条隔离记录待复核"),
    (rf"deny list v(?P<have>\d+); v(?P<current>\d+) out since {_w('at')}",
     "黑名单 v{have}；v{current} 已于 {at} 发布"),
    (r"alarm (?P<n>\d+) not found", "没有告警 {n}"),
    (rf"alarm (?P<n>\d+) was acknowledged by (?P<by>.+) at {_w('at')}", "告警 {n} 已由 {by} 于 {at} 确认"),
]
_COMPILED = [(re.compile(english, re.S), chinese) for english, chinese in _RULES]


@functools.lru_cache(maxsize=2048)
def chinese(text: str) -> str | None:
    """The Chinese of an English domain message, or None when no pattern knows it."""
    for pattern, template in _COMPILED:
        found = pattern.fullmatch(text.strip())
        if found is None:
            continue
        values = {}
        for name, value in found.groupdict().items():
            value = value or ""
            if name.endswith("_msg"):
                values[name.removesuffix("_msg")] = chinese(value) or value
            elif name == "kind":
                values[name] = KINDS.get(value, value)
            else:
                values[name] = value
        return template.format(**values)
    return None


def zh_en(text: str) -> tuple[str, str]:
    """(Chinese, English) for a message written in English: the English unchanged, the Chinese when a pattern
    knows the message, else the English on both sides."""
    return chinese(text) or text, text
