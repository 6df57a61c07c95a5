"""A small simulated city: one bus company, its routes, buses with validators, drivers and riders' cards.

Everything the plan names is built from a seed, so two runs with the same seed tap the same cards at the same
times. The riders' cards and the PSAMs are hardware_sim devices; the validators are the real validator code.

Codes (operator, routes, vehicles, devices, staff numbers, card numbers) carry the run's tag, so that runs share a
database and a broker without meeting; names (the company's, the routes', the drivers', the plates, the holders')
never do: they are what people read. A bus is named to people by its plate (``BusPlan.name``), as on the vehicle
settlement and the validators page.

Beside the cards, a few riders buy e-tickets in the bus company's app (single rides and a day pass, ``tickets``) and
show them on the buses (``ticket_rides``): the QR code to the bus's 2D scanner, or the 16-digit pickup code read
out to the driver, who keys it in. One single ride is never used (its money is recognised when it expires), and one
is shown a second time on the same bus (refused: already used). They come from a random stream of their own, so
the card taps are the same with or without them.
"""

from __future__ import annotations

import dataclasses
import random
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from epurse.cardtypes import CardType


@dataclasses.dataclass(frozen=True)
class RoutePlan:
    code: str
    name: str
    fare: int  # fen


@dataclasses.dataclass(frozen=True)
class BusPlan:
    vehicle: str
    plate: str
    device_id: str
    terminal_id: bytes  # the PSAM's terminal number
    route: str
    driver: str  # staff number
    number: int = 0  # the bus's place in the plan, 1..n ("bus 3")

    @property
    def name(self) -> str:
        """How people are told which bus: its plate."""
        return self.plate


@dataclasses.dataclass(frozen=True)
class DriverPlan:
    staff_no: str
    name: str
    asn: bytes


@dataclasses.dataclass(frozen=True)
class CardPlan:
    asn: bytes
    card_type: CardType
    balance: int  # fen on the card when it was issued (the book's opening balance)
    holder: str = ""
    proof: str = ""  # a concession card's proof, shown at issue (student or elderly id)


@dataclasses.dataclass(frozen=True)
class Tap:
    at: datetime  # UTC
    bus: int  # index into CityPlan.buses
    card: bytes | None  # a rider's ASN, or None for the bus's driver card


@dataclasses.dataclass(frozen=True)
class Outage:
    bus: int
    start: datetime  # UTC
    end: datetime


@dataclasses.dataclass(frozen=True)
class ProductPlan:
    code: str
    kind: str  # single | day_pass (backoffice.tickets.catalogue)
    name: str
    price: int  # fen
    ride_value: int = 0  # a pass's revenue per ride (rule per_ride); 0: not a pass


@dataclasses.dataclass(frozen=True)
class TicketPlan:
    """A ticket a rider buys in the bus company's app before riding."""

    product: str  # ProductPlan.code
    holder: str
    phone: str


@dataclasses.dataclass(frozen=True)
class TicketRide:
    at: datetime  # UTC
    bus: int  # index into CityPlan.buses
    ticket: int  # index into CityPlan.tickets
    presented: str  # qr (the scanner) | pickup (the driver keys the code)


@dataclasses.dataclass(frozen=True)
class CityPlan:
    operator: str
    operator_name: str
    tz: str
    day: date
    routes: tuple[RoutePlan, ...]
    buses: tuple[BusPlan, ...]
    drivers: tuple[DriverPlan, ...]
    cards: tuple[CardPlan, ...]
    denied: frozenset[bytes]  # ASNs on the deny list
    taps: tuple[Tap, ...]  # the whole day in time order, driver sign-in and sign-out included
    outages: tuple[Outage, ...]
    products: tuple[ProductPlan, ...] = ()
    tickets: tuple[TicketPlan, ...] = ()
    ticket_rides: tuple[TicketRide, ...] = ()  # in time order


_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
_GIVEN = ["伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明", "超", "秀英",
          "霞", "平", "刚", "桂英", "建华", "志强", "晓东", "海燕", "子涵", "一鸣"]


def _asn(tag: str, kind: int, n: int) -> bytes:
    """A 10-byte ASN: the run tag (6 hex digits), a kind (riders 5100, drivers 5900), a serial number."""
    return bytes.fromhex(f"{tag}{kind:04d}{n:010d}")


def _bus_day(rng, at, bus: int, start: float, end: float, trips_per_hour: float, cards) -> list[Tap]:
    """One bus's day: the driver signs in at ``start`` and out at ``end`` (hours), riders from ``cards`` tap at
    random stops between, twice as often in the rush hours."""
    taps = [Tap(at(start), bus, None), Tap(at(end), bus, None)]  # sign in, sign out
    hour = start + 0.05
    while hour < end - 0.05:
        rush = 2.0 if 7 <= hour < 9 or 17 <= hour < 19 else 1.0
        hour += rng.expovariate(trips_per_hour * rush)
        if hour < end - 0.05:
            taps.append(Tap(at(hour), bus, rng.choice(cards).asn))
    return taps


def plan_city(*, tag: str, day: date, seed: int = 7, riders: int = 200, buses: int = 6,
              trips_per_hour: float = 12.0, tz: str = "Asia/Shanghai") -> CityPlan:
    """The demo city. ``tag`` (6 hex digits) keeps this run's codes, staff numbers and card numbers apart from
    earlier runs in the same database and broker."""
    rng = random.Random(seed)
    routes = (RoutePlan(f"{tag}_r1", "1路 Station Loop", 200), RoutePlan(f"{tag}_r15", "15路 University", 200),
              RoutePlan(f"{tag}_k3", "K3 快线 Airport Express", 500))
    drivers = tuple(DriverPlan(f"{tag}-{101 + i}", name, _asn(tag, 5900, i + 1)) for i, name in
                    enumerate(["王伟 Wang Wei", "李娜 Li Na", "张敏 Zhang Min", "刘洋 Liu Yang", "陈静 Chen Jing",
                               "杨帆 Yang Fan"][:buses]))
    bus_plans = tuple(BusPlan(vehicle=f"{tag}_b{i + 1:02d}", plate=f"沪A-{81000 + i}", device_id=f"{tag}_v{i + 1:02d}",
                              terminal_id=bytes.fromhex(f"0100{i + 1:08d}"), route=routes[i % len(routes)].code,
                              driver=drivers[i].staff_no, number=i + 1) for i in range(buses))
    kinds = [CardType.ADULT] * 6 + [CardType.STUDENT, CardType.ELDERLY, CardType.STAFF]
    cards = []
    people = random.Random(seed + 1)  # holders' names from their own stream: the taps stay as they were
    for n in range(riders):
        # Most riders carry enough for the day; one in ten runs dry, to show "insufficient balance".
        balance = rng.choice([300, 500, 700]) if n % 10 == 3 else rng.randrange(2000, 10000, 100)
        kind = rng.choice(kinds)
        holder = people.choice(_SURNAMES) + people.choice(_GIVEN)
        proof = {CardType.STUDENT: f"学生证 S{day.year}{n + 1:04d}",
                 CardType.ELDERLY: f"老年证 E{310000 + n + 1}"}.get(kind, "")
        cards.append(CardPlan(_asn(tag, 5100, 1 + n), kind, balance, holder, proof))
    denied = frozenset({cards[7].asn})

    local = ZoneInfo(tz)
    def at(hour: float) -> datetime:
        wall = datetime.combine(day, time(0)) + timedelta(hours=hour)
        return wall.replace(tzinfo=local).astimezone(ZoneInfo("UTC"))

    taps: list[Tap] = []
    for b in range(buses):
        start, end = 6.0 + rng.random() * 0.5, 21.5 + rng.random()
        taps += _bus_day(rng, at, b, start, end, trips_per_hour, cards)
    # The deny-listed card tries its luck twice.
    taps += [Tap(at(8.25), 0, cards[7].asn), Tap(at(17.5), 3, cards[7].asn)]
    taps.sort(key=lambda t: (t.at, t.bus))
    # Bus 3 drives through a dead zone from 09:00 to 13:00: its link is down, its taps wait in its journal, and the
    # validators page shows the gap in its link history.
    outages = (Outage(2, at(9.0), at(13.0)),)
    products, tickets, rides = _tickets(random.Random(seed + 2), at, buses)
    return CityPlan(operator=f"{tag}_bus", operator_name="示例公交 Example City Bus Co.", tz=tz, day=day,
                    routes=routes, buses=bus_plans, drivers=drivers, cards=tuple(cards), denied=denied,
                    taps=tuple(taps), outages=outages, products=products, tickets=tickets, ticket_rides=rides)


def _tickets(rng: random.Random, at, buses: int):
    """Five single rides and a day pass, and when and where they are shown (between 07:30 and 19:00, when every
    bus has its driver signed in). Single ride 4 is never used; single ride 3 is shown twice on the same bus."""
    products = (ProductPlan("ride", "single", "单程票 Single ride", 200),
                ProductPlan("day", "day_pass", "一日票 Day pass", 1000, ride_value=200))
    holders = ["赵磊", "钱芳", "孙杰", "李静", "周涛", "吴霞"]
    tickets = tuple(TicketPlan("day" if i == 5 else "ride", holders[i], f"1390000{rng.randrange(10000):04d}")
                    for i in range(6))

    def bus() -> int:
        return rng.randrange(buses)

    three = bus()
    rides = [TicketRide(at(7.5 + rng.random()), bus(), 5, "qr"),
             TicketRide(at(8.0 + rng.random()), bus(), 0, "qr"),
             TicketRide(at(10.0 + rng.random()), bus(), 1, "qr"),
             TicketRide(at(11.0 + rng.random()), bus(), 2, "pickup"),
             TicketRide(at(12.0 + rng.random()), bus(), 5, "qr"),
             TicketRide(at(15.0 + rng.random()), three, 3, "qr"),
             TicketRide(at(16.5 + rng.random()), three, 3, "qr"),  # again, much later: already used
             TicketRide(at(18.0 + rng.random()), bus(), 5, "qr")]
    return products, tickets, tuple(sorted(rides, key=lambda r: r.at))


def plan_large_city(*, tag: str, day: date, seed: int = 7, buses: int = 1000, riders_per_bus: int = 20,
                    trips_per_hour: float = 6.0, district: int = 100, tz: str = "Asia/Shanghai") -> CityPlan:
    """A city of ``buses`` buses (``farebox demo --buses N``): a route per ten buses, a driver per bus, and
    ``riders_per_bus`` riders' cards per bus. The buses are grouped in districts of ``district`` buses, in plan
    order, and a rider rides only the buses of their own district (``district_of``): each district's buses and
    cards can then be run by a process of their own, the cards' balances staying in one place. One bus in a
    hundred drives through a dead zone from 09:00 to 13:00. No deny-listed card, no e-tickets (the small city of
    :func:`plan_city` shows those). Codes carry ``tag`` as in :func:`plan_city`."""
    if buses < 1 or district < 1 or riders_per_bus < 1:
        raise ValueError("a city needs at least one bus, one bus per district and one rider per bus")
    rng = random.Random(seed)
    people = random.Random(seed + 1)
    fares = (200, 200, 200, 200, 300, 500)
    routes = tuple(RoutePlan(f"{tag}_r{n + 1}", f"{n + 1}路", fares[n % len(fares)])
                   for n in range(max(1, (buses + 9) // 10)))
    drivers = tuple(DriverPlan(f"{tag}-{1001 + i}", people.choice(_SURNAMES) + people.choice(_GIVEN),
                               _asn(tag, 5900, i + 1)) for i in range(buses))
    bus_plans = tuple(BusPlan(vehicle=f"{tag}_b{i + 1:04d}", plate=f"沪B-{10000 + i}", device_id=f"{tag}_v{i + 1:04d}",
                              terminal_id=bytes.fromhex(f"0200{i + 1:08d}"), route=routes[i // 10].code,
                              driver=drivers[i].staff_no, number=i + 1) for i in range(buses))
    kinds = [CardType.ADULT] * 6 + [CardType.STUDENT, CardType.ELDERLY, CardType.STAFF]
    cards = []
    for n in range(buses * riders_per_bus):
        balance = rng.choice([300, 500, 700]) if n % 10 == 3 else rng.randrange(2000, 10000, 100)
        kind = rng.choice(kinds)
        holder = people.choice(_SURNAMES) + people.choice(_GIVEN)
        proof = {CardType.STUDENT: f"学生证 S{day.year}{n + 1:06d}",
                 CardType.ELDERLY: f"老年证 E{3100000 + n + 1}"}.get(kind, "")
        cards.append(CardPlan(_asn(tag, 5100, 1 + n), kind, balance, holder, proof))

    local = ZoneInfo(tz)
    midnight = datetime.combine(day, time(0)).replace(tzinfo=local)

    def at(hour: float) -> datetime:
        return (midnight + timedelta(hours=hour)).astimezone(ZoneInfo("UTC"))

    per_district = district * riders_per_bus
    taps: list[Tap] = []
    for b in range(buses):
        first = (b // district) * per_district
        pool = cards[first:first + per_district]
        start, end = 5.5 + rng.random(), 21.5 + rng.random()
        taps += _bus_day(rng, at, b, start, end, trips_per_hour, pool)
    taps.sort(key=lambda t: (t.at, t.bus))
    outages = tuple(Outage(b, at(9.0), at(13.0)) for b in range(2, buses, 100))
    return CityPlan(operator=f"{tag}_bus", operator_name="示例公交 Example City Bus Co.", tz=tz, day=day,
                    routes=routes, buses=bus_plans, drivers=drivers, cards=tuple(cards), denied=frozenset(),
                    taps=tuple(taps), outages=outages)

