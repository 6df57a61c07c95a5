"""The back office's tables (SQLAlchemy 2.x). The Alembic revisions in backoffice/migrations are the schema's truth;
these classes must match them (a test compares the two).

Money is integer fen; times are UTC. A tap is stored once per (device_id, device_seq), the dedupe key every device
record carries.
"""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Operator(Base):
    """A bus company."""

    __tablename__ = "operator"
    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64), default="Asia/Shanghai")
    cutoff_hour: Mapped[int] = mapped_column(Integer, default=3)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Route(Base):
    """A route as it is now; its history (name, fare, stops) is in route_version."""

    __tablename__ = "route"
    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    name: Mapped[str] = mapped_column(String(200))
    flat_fare: Mapped[int] = mapped_column(Integer)  # fen; 0 when the route has distance stages or no fare yet
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Vehicle(Base):
    __tablename__ = "vehicle"
    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    plate: Mapped[str] = mapped_column(String(32))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Driver(Base):
    __tablename__ = "driver"
    staff_no: Mapped[str] = mapped_column(String(32), primary_key=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    name: Mapped[str] = mapped_column(String(200))
    card_asn: Mapped[str] = mapped_column(String(20), unique=True)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Device(Base):
    """A validator, mounted in a vehicle."""

    __tablename__ = "device"
    device_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    vehicle: Mapped[str | None] = mapped_column(ForeignKey("vehicle.code"), nullable=True)
    terminal_id: Mapped[str] = mapped_column(String(12))  # the PSAM's terminal number, hex
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


# ------------------------------------------------------------------------------------------- registry history
# The tables above say how things are now. Each edit closes the version in force (valid_to) and opens a new one
# (valid_from), so a settlement of last month names last month's route and driver (backoffice.registry.names).
class OperatorVersion(Base):
    """An operator's name, service day and fare rules (card-type discounts, transfer, minimum balance) over time."""

    __tablename__ = "operator_version"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    code: Mapped[str] = mapped_column(ForeignKey("operator.code"), index=True)
    valid_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    valid_to: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64))
    cutoff_hour: Mapped[int] = mapped_column(Integer)
    transfer_window_minutes: Mapped[int] = mapped_column(Integer, server_default="0")
    transfer_discount: Mapped[int] = mapped_column(Integer, server_default="0")  # fen
    min_balance: Mapped[int] = mapped_column(Integer, server_default="0")  # fen


class CardTypeDiscount(Base):
    """Percent of the fare a card type pays, under one operator version (types not listed pay 100)."""

    __tablename__ = "card_type_discount"
    operator_version_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("operator_version.id"), primary_key=True)
    card_type: Mapped[int] = mapped_column(Integer, primary_key=True)
    percent: Mapped[int] = mapped_column(Integer)


class RouteVersion(Base):
    """A route's name and fare over time: a flat fare, or distance stages (route_fare_stage), or none yet."""

    __tablename__ = "route_version"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    code: Mapped[str] = mapped_column(ForeignKey("route.code"), index=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    valid_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    valid_to: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    flat_fare: Mapped[int | None] = mapped_column(Integer, nullable=True)  # fen
    max_trip_minutes: Mapped[int] = mapped_column(Integer, server_default="180")


class RouteFareStage(Base):
    """A distance fare's stage: a ride of at most ``up_to_stops`` stops costs ``fare`` fen."""

    __tablename__ = "route_fare_stage"
    route_version_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("route_version.id"), primary_key=True)
    up_to_stops: Mapped[int] = mapped_column(Integer, primary_key=True)
    fare: Mapped[int] = mapped_column(Integer)


class Stop(Base):
    """A bus stop, by the operator's (or its GTFS feed's) stop id."""

    __tablename__ = "stop"
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"), primary_key=True)
    code: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    lat: Mapped[float | None] = mapped_column(Float, nullable=True)
    lon: Mapped[float | None] = mapped_column(Float, nullable=True)


class RouteStop(Base):
    """The stops of a route version in riding order, per direction (GTFS direction_id 0 or 1)."""

    __tablename__ = "route_stop"
    route_version_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("route_version.id"), primary_key=True)
    direction: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0, 1, 2 ... the stop number a validator counts
    stop: Mapped[str] = mapped_column(String(64))  # stop.code of the route's operator


class VehicleVersion(Base):
    __tablename__ = "vehicle_version"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    code: Mapped[str] = mapped_column(ForeignKey("vehicle.code"), index=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    valid_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    valid_to: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    plate: Mapped[str] = mapped_column(String(32))


class DriverVersion(Base):
    __tablename__ = "driver_version"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    staff_no: Mapped[str] = mapped_column(ForeignKey("driver.staff_no"), index=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    valid_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    valid_to: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    card_asn: Mapped[str] = mapped_column(String(20))


class DriverCard(Base):
    """Every driver card ever issued. A withdrawn card (replaced, or its driver retired) is marked here; putting
    it on the deny list is the deny-list publisher's job."""

    __tablename__ = "driver_card"
    asn: Mapped[str] = mapped_column(String(20), primary_key=True)
    staff_no: Mapped[str] = mapped_column(ForeignKey("driver.staff_no"), index=True)
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    withdrawn_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    reason: Mapped[str] = mapped_column(String(200), server_default="")


class DeviceVersion(Base):
    """Which vehicle a validator was mounted in (and its PSAM terminal number) over time."""

    __tablename__ = "device_version"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("device.device_id"), index=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    valid_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    valid_to: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    vehicle: Mapped[str | None] = mapped_column(String(32), nullable=True)
    terminal_id: Mapped[str] = mapped_column(String(12))


class RegistryAudit(Base):
    """Who changed what in the registry, and when (recorded_at: the clock; effective_at: from when it holds)."""

    __tablename__ = "registry_audit"
    __table_args__ = (Index("ix_registry_audit_operator", "operator", "recorded_at"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    effective_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    by: Mapped[str] = mapped_column(String(64))
    operator: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(16))  # add | edit | retire | assign | import
    kind: Mapped[str] = mapped_column(String(16))  # operator | route | vehicle | driver | device | fleet | stop
    key: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(String(2000))  # what changed: "name: 'a' -> 'b'; flat_fare: 200 -> 250"


class Card(Base):
    __tablename__ = "card"
    # (status, asn): the deny-list publisher's look for denied cards reads the index alone (revision 0016)
    __table_args__ = (Index("ix_card_status", "status", "asn"),)
    asn: Mapped[str] = mapped_column(String(20), primary_key=True)
    card_type: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | lost | blocked | fraud


def tap_service_day(at: datetime, tz: str, cutoff_hour: int) -> date:
    """The service day of one moment (as ``clearing.service_day.service_day`` reads a column): the operator's wall
    clock, ``cutoff_hour`` hours back, its date. A naive ``at`` is UTC (SQLite hands stored UTC back naive)."""
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
    return (at.astimezone(_zone(tz)).replace(tzinfo=None) - timedelta(hours=cutoff_hour)).date()


_zone = functools.lru_cache(maxsize=64)(ZoneInfo)


def _service_day_default(context) -> date:
    """A tap inserted without its service day (tools, tests, old scripts) gets it from its operator's rule, read
    once per statement; ingest gives it explicitly. Unknown operators get the default rule (Asia/Shanghai, 03:00)."""
    params = context.get_current_parameters()
    rules = context.__dict__.setdefault("_farebox_day_rules", {})
    code = params["operator"]
    if code not in rules:
        row = context.connection.execute(select(Operator.timezone, Operator.cutoff_hour)
                                         .where(Operator.code == code)).first()
        rules[code] = (row.timezone, row.cutoff_hour) if row else ("Asia/Shanghai", 3)
    return tap_service_day(params["occurred_at"], *rules[code])


class Tap(Base):
    """A validator's record, stored once. On PostgreSQL the table is partitioned by ``service_day`` (one partition a
    day, ``tap_2026_11_02``, and ``tap_default`` for days without one: backoffice.partitions, revision 0026); SQLite
    keeps one table with the same columns. Keys include the partition column, as PostgreSQL requires; that they
    still mean exactly once is argued in backoffice.partitions (the day is a function of the MAC'd record under a
    rule frozen per operator once it has taps)."""

    __tablename__ = "tap"
    # The dedupe key: a device's journal (epoch) and its sequence in it (revision 2026_12_03_0011), and the service
    # day it is stored under (revision 2026_12_03_0026). On PostgreSQL the primary key is (id, service_day).
    __table_args__ = (UniqueConstraint("device_id", "epoch", "device_seq", "service_day",
                                       name="uq_tap_device_epoch_seq"),
                      Index("ix_tap_card_ttc", "card_asn", "card_ttc"))
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(32))
    device_seq: Mapped[int] = mapped_column(BigInteger)
    epoch: Mapped[int] = mapped_column(BigInteger, server_default="0")  # the validator journal (wire.records)
    kind: Mapped[str] = mapped_column(String(16))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    operator: Mapped[str] = mapped_column(String(32))
    route: Mapped[str] = mapped_column(String(64))  # wire.codec.MAX_TEXT
    vehicle: Mapped[str] = mapped_column(String(64))
    driver: Mapped[str] = mapped_column(String(64))
    shift_no: Mapped[int] = mapped_column(Integer)
    card_asn: Mapped[str] = mapped_column(String(20))
    card_type: Mapped[int] = mapped_column(Integer)
    card_ttc: Mapped[int] = mapped_column(Integer)
    amount: Mapped[int] = mapped_column(BigInteger)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    terminal_id: Mapped[str] = mapped_column(String(12))
    terminal_seq: Mapped[int] = mapped_column(BigInteger)
    tac: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str] = mapped_column(String(200))
    tx_type: Mapped[int] = mapped_column(Integer, server_default="6")
    algorithm: Mapped[int] = mapped_column(Integer, server_default="0")
    full_fare: Mapped[int] = mapped_column(Integer, server_default="0")
    entry_stop: Mapped[int] = mapped_column(Integer, server_default="0")
    exit_stop: Mapped[int] = mapped_column(Integer, server_default="0")
    # The clearing run that took this tap; NULL until one claims it (backoffice.clearing_runs, revision 0012).
    clearing_run_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("clearing_run.id"), nullable=True,
                                                        index=True)
    # The operator's service day of occurred_at under its rule (time zone, cut-off hour) when stored: the partition
    # key on PostgreSQL (revision 2026_12_03_0026).
    service_day: Mapped[date] = mapped_column(Date, default=_service_day_default)


class Quarantine(Base):
    """What ingest could not accept, with the reason; kept, never cleared, for operations to look at."""

    __tablename__ = "quarantine"
    # A record quarantined once is not quarantined again for the same reason when its batch is resent; a forged
    # copy of a device's record (another reason) cannot take the place of the genuine one. NULL seqs stay distinct.
    # On PostgreSQL the table is partitioned by received_day (the UTC date it arrived: a quarantined record has no
    # trustworthy operator day), so the key includes it; ingest looks for the same record and reason on other days
    # before it adds a row (backoffice.ingest), so a batch resent tomorrow is not quarantined twice either.
    __table_args__ = (UniqueConstraint("device_id", "device_seq", "reason", "received_day",
                                       name="uq_quarantine_record_reason"),
                      Index("ix_quarantine_status", "status", "id"))
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    topic: Mapped[str] = mapped_column(String(200))
    device_id: Mapped[str] = mapped_column(String(32))
    device_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    reason: Mapped[str] = mapped_column(String(500))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    # Review (backoffice.quarantine, revision 0013). signed: the message carrying the record verified with its
    # device's key (NULL: the row keeps the whole message, whose MAC a release checks again).
    signed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    status: Mapped[str] = mapped_column(String(16), server_default="open")  # open | released | rejected
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    resolved_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    resolution: Mapped[str] = mapped_column(String(500), server_default="")  # the reviewer's why, and the outcome
    tap_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # the tap a release stored (or found)
    rechecked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    recheck_reason: Mapped[str | None] = mapped_column(String(500), nullable=True)  # a release that still failed
    # The UTC date of received_at (ingest writes it); a row inserted without it gets the UTC date it is inserted on
    # (a server default, so an insert through this class also works on a schema before revision 0026).
    received_day: Mapped[date] = mapped_column(Date, server_default=text("CURRENT_DATE"))


class DeviceStatus(Base):
    """What each validator last said about itself (birth, heartbeat, or its last will when it dropped off)."""

    __tablename__ = "device_status"
    device_id: Mapped[str] = mapped_column(ForeignKey("device.device_id"), primary_key=True)
    online: Mapped[bool] = mapped_column(Boolean)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_birth: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    software: Mapped[str] = mapped_column(String(64), server_default="")
    params_version: Mapped[int] = mapped_column(Integer, server_default="0")
    denylist_version: Mapped[int] = mapped_column(Integer, server_default="0")
    backlog: Mapped[int] = mapped_column(Integer, server_default="0")
    oldest_unsent: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    psam: Mapped[str] = mapped_column(String(12), server_default="")
    last_tap: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    alarms: Mapped[str] = mapped_column(String(500), server_default="")


class FraudFlag(Base):
    """A second record of the same card transaction (card ASN, card TTC) with different content."""

    __tablename__ = "fraud_flag"
    __table_args__ = (UniqueConstraint("card_asn", "card_ttc", "second_device_id", "second_device_seq",
                                       name="uq_fraud_flag_record"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    detected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    card_asn: Mapped[str] = mapped_column(String(20), index=True)
    card_ttc: Mapped[int] = mapped_column(Integer)
    first_device_id: Mapped[str] = mapped_column(String(32))
    first_device_seq: Mapped[int] = mapped_column(BigInteger)
    second_device_id: Mapped[str] = mapped_column(String(32))
    second_device_seq: Mapped[int] = mapped_column(BigInteger)
    detail: Mapped[str] = mapped_column(String(500))


class DenyListVersion(Base):
    """One published deny list: the whole file, so any two versions give a delta."""

    __tablename__ = "denylist_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    count: Mapped[int] = mapped_column(Integer)
    checksum: Mapped[str] = mapped_column(String(64))
    body: Mapped[bytes] = mapped_column(LargeBinary)


class Package(Base):
    """A parameter or software package published to a fleet or one device, kept as sent."""

    __tablename__ = "package"
    __table_args__ = (UniqueConstraint("kind", "operator", "target", "version", name="uq_package_version"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    target: Mapped[str] = mapped_column(String(40))
    version: Mapped[str] = mapped_column(String(32))
    activate_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sha256: Mapped[str] = mapped_column(String(64))
    payload: Mapped[bytes] = mapped_column(LargeBinary)


# ---------------------------------------------------------------------------------- clearing and reconciliation
# Imported here rather than at the top so this section stays an append (other sections are added the same way).
from datetime import date

from sqlalchemy import Date


class Fleet(Base):
    """A group of an operator's vehicles (a depot, a branch company) that settlement reports add up."""

    __tablename__ = "fleet"
    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    name: Mapped[str] = mapped_column(String(200))


class FleetVehicle(Base):
    """A vehicle's fleet from a service day on; the history stays so an old day re-cleared names its fleet then."""

    __tablename__ = "fleet_vehicle"
    vehicle: Mapped[str] = mapped_column(ForeignKey("vehicle.code"), primary_key=True)
    valid_from: Mapped[date] = mapped_column(Date, primary_key=True)
    fleet: Mapped[str] = mapped_column(ForeignKey("fleet.code"))


class CommissionRate(Base):
    """The card issuer's commission on an operator's gross, in basis points, from a service day on."""

    __tablename__ = "commission_rate"
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"), primary_key=True)
    valid_from: Mapped[date] = mapped_column(Date, primary_key=True)
    rate_bp: Mapped[int] = mapped_column(Integer)


class ClearingRun(Base):
    """One operator's service day cleared: its window, the inputs' fingerprint and its totals (fen)."""

    __tablename__ = "clearing_run"
    __table_args__ = (UniqueConstraint("operator", "service_day", name="uq_clearing_run_day"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    service_day: Mapped[date] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    as_of: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    carried_from: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    rate_bp: Mapped[int] = mapped_column(Integer)
    tz: Mapped[str] = mapped_column(String(64))
    cutoff_hour: Mapped[int] = mapped_column(Integer)
    fingerprint: Mapped[str] = mapped_column(String(64))
    day_taps: Mapped[int] = mapped_column(BigInteger)
    day_gross: Mapped[int] = mapped_column(BigInteger)
    day_commission: Mapped[int] = mapped_column(BigInteger)
    day_net: Mapped[int] = mapped_column(BigInteger)
    late_taps: Mapped[int] = mapped_column(BigInteger)
    late_gross: Mapped[int] = mapped_column(BigInteger)
    late_commission: Mapped[int] = mapped_column(BigInteger)
    late_net: Mapped[int] = mapped_column(BigInteger)
    reconciliation_gross: Mapped[int] = mapped_column(BigInteger)
    reconciliation_commission: Mapped[int] = mapped_column(BigInteger)
    reconciliation_net: Mapped[int] = mapped_column(BigInteger)
    # The last tap id of its day that the run took as a block (revision 2026_12_03_0027, clearing_runs.claim_taps);
    # NULL for runs that wrote their id into every tap they took.
    claim_watermark: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ClearingRow(Base):
    """One row of a run: a section (day | late | reconciliation), a dimension and key, and its money."""

    __tablename__ = "clearing_row"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    run_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("clearing_run.id"), index=True)
    section: Mapped[str] = mapped_column(String(16))
    dimension: Mapped[str] = mapped_column(String(16))
    key: Mapped[str] = mapped_column(String(40))
    for_day: Mapped[date] = mapped_column(Date)
    taps: Mapped[int] = mapped_column(BigInteger)
    gross: Mapped[int] = mapped_column(BigInteger)
    commission: Mapped[int] = mapped_column(BigInteger)
    net: Mapped[int] = mapped_column(BigInteger)


class ReconItem(Base):
    """Something reconciliation found, for a clerk to accept, adjust (carried into the next run) or dispute."""

    __tablename__ = "recon_item"
    __table_args__ = (UniqueConstraint("operator", "kind", "ref", "problem", name="uq_recon_item"),
                      Index("ix_recon_item_status", "operator", "status"))
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    kind: Mapped[str] = mapped_column(String(16))
    service_day: Mapped[date] = mapped_column(Date)
    ref: Mapped[str] = mapped_column(String(80))
    problem: Mapped[str] = mapped_column(String(32))
    ours: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    theirs: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    detail: Mapped[str] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(16), server_default="open")
    adjustment: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    resolved_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    note: Mapped[str] = mapped_column(String(500), server_default="")
    carried_run_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("clearing_run.id"), nullable=True)


# --- cards and money (issue 5: backoffice/cards) ----------------------------------------------------------------
# Appended below the other domains' tables (date and Date come from the clearing section's imports above).
from sqlalchemy import text


class CardAccount(Base):
    """What issuance knows of a card beyond the deny list's ``card`` row: its algorithm, validity, deposit, the
    proof behind a concession type, its opening balance and counters, and (once lost or blocked) the balance
    frozen for refund."""

    __tablename__ = "card_account"
    asn: Mapped[str] = mapped_column(ForeignKey("card.asn"), primary_key=True)
    algorithm: Mapped[int] = mapped_column(Integer)
    issuer: Mapped[str] = mapped_column(String(16))
    valid_from: Mapped[date] = mapped_column(Date)
    valid_to: Mapped[date] = mapped_column(Date)
    deposit: Mapped[int] = mapped_column(BigInteger)  # fen, refundable with the card
    opening_balance: Mapped[int] = mapped_column(BigInteger)  # fen on the card when issued
    # The card's offline (purchase) and online (load) TTC when issued; NULL: not known (a card that would not
    # tell, or issued before revision 0010). The ledger finds a missing first purchase or load with them.
    opening_purchase_ttc: Mapped[int | None] = mapped_column(Integer, nullable=True)
    opening_load_ttc: Mapped[int | None] = mapped_column(Integer, nullable=True)
    proof: Mapped[str] = mapped_column(String(200), server_default="")  # e.g. student id, for concession types
    holder: Mapped[str] = mapped_column(String(200), server_default="")
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    issued_by: Mapped[str] = mapped_column(String(64))
    frozen_balance: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    frozen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class TopupOrder(Base):
    """An over-the-air top-up: created, paid (webhook), authorized (MAC2 given), loaded; or refunded."""

    __tablename__ = "topup_order"
    order_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    asn: Mapped[str] = mapped_column(ForeignKey("card.asn"), index=True)
    rider: Mapped[str] = mapped_column(String(64))
    amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    payment_ref: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class PaymentEvent(Base):
    """Every verified payment-platform webhook, once per event id (a duplicate delivery finds its row)."""

    __tablename__ = "payment_event"
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(40), index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(String(2000))


class CardLoad(Base):
    """One load the host authorised (MAC2 given), at the counter or over the air, and what became of it.

    ``status``: authorized (MAC2 out, no TAC yet), loaded (TAC verified, or the card's log shows it), void (the
    card's online counter proves it never happened). At most one loaded row per (card, online TTC)."""

    __tablename__ = "card_load"
    __table_args__ = (
        Index("uq_card_load_loaded", "asn", "online_ttc", unique=True,
              sqlite_where=text("status = 'loaded'"), postgresql_where=text("status = 'loaded'")),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    asn: Mapped[str] = mapped_column(ForeignKey("card.asn"), index=True)
    channel: Mapped[str] = mapped_column(String(8))  # counter | ota
    order_id: Mapped[str | None] = mapped_column(ForeignKey("topup_order.order_id"), nullable=True, index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    balance_before: Mapped[int] = mapped_column(BigInteger)
    online_ttc: Mapped[int] = mapped_column(Integer)  # the card's online counter before this load
    algorithm: Mapped[int] = mapped_column(Integer)
    card_random: Mapped[str] = mapped_column(String(8))
    mac1: Mapped[str] = mapped_column(String(8))
    terminal_id: Mapped[str] = mapped_column(String(12))
    tx_date: Mapped[str] = mapped_column(String(8))  # BCD YYYYMMDD the MAC2 covers, kept to answer a retry alike
    tx_time: Mapped[str] = mapped_column(String(6))
    mac2: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16))
    tac: Mapped[str | None] = mapped_column(String(8), nullable=True)
    confirmed_by: Mapped[str | None] = mapped_column(String(16), nullable=True)  # tac | card_log | staff
    staff: Mapped[str] = mapped_column(String(64))
    authorized_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class CardEntry(Base):
    """A ledger entry that is not a tap or a load: adjustment (+/- fen) or refund (fen paid back to the holder)."""

    __tablename__ = "card_entry"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    asn: Mapped[str] = mapped_column(ForeignKey("card.asn"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # adjustment | refund
    amount: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    who: Mapped[str] = mapped_column(String(64))
    why: Mapped[str] = mapped_column(String(500))


class CardCase(Base):
    """An anomaly on a card's ledger, for a person to review; raised once per (card, kind, key)."""

    __tablename__ = "card_case"
    __table_args__ = (UniqueConstraint("asn", "kind", "key", name="uq_card_case"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    asn: Mapped[str] = mapped_column(ForeignKey("card.asn"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(16), server_default="open")  # open | closed
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    closed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    resolution: Mapped[str] = mapped_column(String(500), server_default="")


class CardAudit(Base):
    """Who did what to a card or an order, when and why. Written in the same transaction as the change."""

    __tablename__ = "card_audit"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    who: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    asn: Mapped[str | None] = mapped_column(String(20), nullable=True, index=True)
    order_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    amount: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    why: Mapped[str] = mapped_column(String(500))
    detail: Mapped[str] = mapped_column(String(1000), server_default="")


# --- payment platform reconciliation (issue 5: backoffice/cards/payments_recon) -----------------------------------
class PaymentReconItem(Base):
    """A difference between the payment platform's daily file and farebox's over-the-air top-up orders, for
    mobile-operator staff to settle: open, accepted, refunded, retried or disputed. One per (order, problem)."""

    __tablename__ = "payment_recon_item"
    __table_args__ = (UniqueConstraint("order_id", "problem", name="uq_payment_recon_item"),
                      Index("ix_payment_recon_item_status", "status"))
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    day: Mapped[date] = mapped_column(Date)
    order_id: Mapped[str] = mapped_column(String(40))
    problem: Mapped[str] = mapped_column(String(32))
    ours: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # fen loaded onto the card
    theirs: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # fen the platform collected
    detail: Mapped[str] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(16), server_default="open")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    resolved_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    note: Mapped[str] = mapped_column(String(500), server_default="")


# --- web page sessions (issue 9: backoffice/web/sessions.py, revision 2026_12_03_0014) -----------------------------
class WebSession(Base):
    """One login on the web pages: the SHA-256 of the id in the browser's cookie, the SHA-256 of the API token it
    was opened with (revoked or expired, the session ends with it), until when it lasts, when logout ended it."""

    __tablename__ = "web_session"
    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


# --- tickets beside cards (issue 11: backoffice/tickets, revision 2026_12_03_0020) ---------------------------------
from sqlalchemy import CheckConstraint  # noqa: E402  (date and Date come from the clearing section's imports above)


class Product(Base):
    """Something an operator sells that is not stored value: a single ride, a day or month pass, a coach trip."""

    __tablename__ = "product"
    __table_args__ = (UniqueConstraint("operator", "code", name="uq_product_operator_code"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    code: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))  # single | day_pass | month_pass | coach_trip
    name: Mapped[str] = mapped_column(String(200))
    price_fen: Mapped[int] = mapped_column(BigInteger)
    routes: Mapped[str] = mapped_column(String(1000), server_default="")  # space-separated route codes; "" = any
    validity_days: Mapped[int] = mapped_column(Integer, server_default="1")  # the operator's service days
    uses: Mapped[int] = mapped_column(Integer, server_default="1")  # rides allowed; 0 = unlimited within validity
    rider_category: Mapped[int] = mapped_column(Integer, server_default="1")  # epurse.cardtypes.CardType
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(64), server_default="")


class Departure(Base):
    """A coach trip's timetabled departure and its seats; ``seats_taken`` = held by unpaid orders + sold."""

    __tablename__ = "departure"
    __table_args__ = (CheckConstraint("seats_taken >= 0 AND seats_taken <= seats", name="ck_departure_seats"),
                      UniqueConstraint("product_id", "route", "direction", "departs_at", name="uq_departure"),
                      Index("ix_departure_day", "operator", "service_date"))
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    product_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("product.id"))
    route: Mapped[str] = mapped_column(String(32))
    direction: Mapped[int] = mapped_column(Integer, server_default="0")  # GTFS direction_id: which stop order
    service_date: Mapped[date] = mapped_column(Date)
    departs_local: Mapped[str] = mapped_column(String(5))  # HH:MM on the operator's clock
    departs_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    seats: Mapped[int] = mapped_column(Integer)
    seats_taken: Mapped[int] = mapped_column(Integer, server_default="0")
    trip_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the GTFS trip it came from
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))


class TicketOrder(Base):
    """An order for tickets: created -> paid -> issued -> used | refunded | expired (backoffice.tickets.orders)."""

    __tablename__ = "ticket_order"
    __table_args__ = (UniqueConstraint("operator", "channel", "idempotency_key", name="uq_ticket_order_idempotency"),
                      Index("ix_ticket_order_state", "state", "expires_at"),
                      Index("ix_ticket_order_phone", "phone"))
    order_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operator.code"))
    channel: Mapped[str] = mapped_column(String(16))  # web | sms | partner | counter
    phone: Mapped[str] = mapped_column(String(32), server_default="")
    state: Mapped[str] = mapped_column(String(16))
    total_fen: Mapped[int] = mapped_column(BigInteger)
    paid_fen: Mapped[int] = mapped_column(BigInteger, server_default="0")
    refunded_fen: Mapped[int] = mapped_column(BigInteger, server_default="0")
    payment_ref: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    issued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class OrderItem(Base):
    __tablename__ = "order_item"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("ticket_order.order_id"), index=True)
    product_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("product.id"))
    departure_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("departure.id"), nullable=True)
    start_date: Mapped[date | None] = mapped_column(Date, nullable=True)  # a pass's first service day
    quantity: Mapped[int] = mapped_column(Integer)
    unit_fen: Mapped[int] = mapped_column(BigInteger)
    amount_fen: Mapped[int] = mapped_column(BigInteger)


class Ticket(Base):
    """One ticket issued: what its signed token says, its pickup serial (unique per operator), its uses."""

    __tablename__ = "ticket"
    __table_args__ = (UniqueConstraint("operator", "pickup_serial", name="uq_ticket_pickup_serial"),
                      Index("ix_ticket_state_valid_to", "state", "valid_to"),
                      Index("ix_ticket_departure", "departure_id"))
    ticket_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    order_id: Mapped[str] = mapped_column(ForeignKey("ticket_order.order_id"), index=True)
    item_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("order_item.id"))
    product_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("product.id"))
    departure_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("departure.id"), nullable=True)
    operator: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))
    routes: Mapped[str] = mapped_column(String(1000), server_default="")
    rider_category: Mapped[int] = mapped_column(Integer)
    price_fen: Mapped[int] = mapped_column(BigInteger)
    valid_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    valid_to: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # exclusive
    uses_allowed: Mapped[int] = mapped_column(Integer)  # 0 = unlimited within validity
    uses_made: Mapped[int] = mapped_column(Integer, server_default="0")
    pickup_serial: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[int] = mapped_column(Integer)
    token: Mapped[str] = mapped_column(String(600))
    state: Mapped[str] = mapped_column(String(16))  # issued | used | refunded | expired
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SeatHold(Base):
    """Seats of a departure an order holds while it is paid for (held), then sold, or released on expiry/refund."""

    __tablename__ = "seat_hold"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    departure_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("departure.id"), index=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("ticket_order.order_id"), index=True)
    seats: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))  # held | sold | released
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class OrderAudit(Base):
    """One line per change of a ticket order's state: who, when, from, to, why (same transaction as the change)."""

    __tablename__ = "order_audit"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("ticket_order.order_id"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    who: Mapped[str] = mapped_column(String(64))
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)  # None: the order was created
    to_state: Mapped[str] = mapped_column(String(16))
    why: Mapped[str] = mapped_column(String(500))
