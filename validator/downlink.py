"""What the back office sends a validator: deny lists, parameters (fare table, route) and software, as signed packages
(``wire.packages``), checked on arrival, staged on disk and applied between taps.

Two threads meet here. The MQTT thread calls :meth:`Downlink.receive`: the package's signature (the configured
public key) and hash are checked, then its kind against the topic, its target against this device, its body
(a deny list or delta that parses, a fare table that builds); what passes is written to the staging folder
atomically (``<kind>-<version>.pkg``, the signed bytes as they came, so a reboot re-checks them) and waits. The
validator's main loop calls :meth:`Downlink.apply_due` between taps (``ValidatorApp.load_parameters``), never during
one: each staged package whose activation time has come (by the terminal's clock) is applied in activation order.

- Deny list, delta: must start from the version loaded (or the one a staged package will bring); applied with
  ``blacklist.delta.swap``, which writes the new file atomically and refuses a result whose checksum is not the one
  announced. A delta from another base is refused at once and the device sends a heartbeat with its version, so the
  back office sends the delta from that version or the full list.
- Deny list, full: replaces the file atomically (``replace_file``) when its version is above the loaded one.
- Deny list, JSON body (or empty): the back office's announcement of the current version (on ``_fleet``,
  ``backoffice.publisher``); a device behind says its version at once, in a heartbeat.
- Params: a fare table (``FareTable.to_dict``) is written to the fares file atomically and swapped in with
  ``Terminal.replace_fares``; a route assignment replaces the terminal's route; ticket keys (``tickets``: public
  keys, pickup key, denied ticket ids) replace ``Terminal.ticket_params`` whole. The package version is the params
  version reported in status; it, the route and the ticket keys survive a restart (``state.json`` in the staging
  folder).
- Software: at activation the tarball is written to ``software/<version>.tar`` and the marker
  ``software/ACTIVATE`` (JSON: version, file, sha256) names it: the bus's boot script installs it at the next boot.
  Nothing is executed here. Status keeps reporting the running version, and "software <v> staged" until the boot
  script runs it.

A package that fails a check is refused with a log line saying why and an alarm ("refused params 7: signature")
in the next heartbeat; the alarm of a kind clears when a package of that kind is applied. A package already applied
or older than the one in force is ignored quietly: retained fleet messages come again at every reconnect. The deny
list raises "denylist stale" when its activation time (the file's time for a list that came another way) is older
than ``denylist_max_age``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path

from blacklist.delta import WIRE_MAGIC as DELTA_MAGIC
from blacklist.delta import Delta, DeltaRefused, decode_delta, swap
from blacklist.denylist import MAGIC as LIST_MAGIC
from blacklist.denylist import DenyList, DenyListError, replace_file
from validator.fares import FareError, FareTable
from validator.terminal import Terminal
from wire.packages import Package, PackageError, parse_params, verify_package
from wire.ticket import TicketParams

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
SOFTWARE_DIR = "software"
MARKER = "ACTIVATE"
_ALARM_LEN = 56  # wire.status.MAX_ALARM_LEN


def running_software() -> str:
    """The version of the farebox installed here (what the bus runs), for status."""
    try:
        return metadata.version("farebox")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass
class _Staged:
    package: Package
    path: Path
    delta: Delta | None = None
    full: DenyList | None = None
    fares: FareTable | None = None

    @property
    def order(self) -> tuple:
        return (self.package.activate_at, self.package.kind, _version_key(self.package))


def _version_key(pkg: Package) -> tuple:
    return (int(pkg.version),) if pkg.version.isdigit() else (0, pkg.version)


class Downlink:
    def __init__(self, terminal: Terminal, *, public_key: bytes, staging_dir: str | Path,
                 deny_file: str | Path | None = None, fares_file: str | Path | None = None,
                 software: str | None = None, denylist_max_age: timedelta | None = None,
                 clock: Callable[[], datetime] | None = None):
        self.terminal = terminal
        self.public_key = public_key
        self.staging = Path(staging_dir)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.deny_file = Path(deny_file) if deny_file else self.staging / "denylist.bin"
        self.fares_file = Path(fares_file) if fares_file else None
        self.software = software or running_software()
        self.denylist_max_age = denylist_max_age
        self.clock = clock or terminal.clock
        self.on_change: Callable[[], None] | None = None  # the uplink sets it: send a heartbeat now
        self._lock = threading.Lock()
        self._staged: dict[tuple[str, str], _Staged] = {}
        self._refused: dict[str, str] = {}  # kind -> alarm text
        self.refusals = 0
        self.applied: list[str] = []  # what was applied, in order ("denylist 7", "params 3", ...)
        self._state = self._load_state()
        self._restore()

    # -- state that survives a restart ------------------------------------------------------------------------

    def _load_state(self) -> dict:
        path = self.staging / STATE_FILE
        try:
            state = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            state = f"{type(e).__name__}: {e}"
        if not isinstance(state, dict):
            log.error("downlink state %s unreadable (%s): starting from the files in force", path, state)
            return {}
        return state

    def _save_state(self) -> None:
        replace_file(self.staging / STATE_FILE, json.dumps(self._state, sort_keys=True).encode())

    def _restore(self) -> None:
        route = self._state.get("route")
        if isinstance(route, str) and route and route != self.terminal.config.route:
            log.info("device %s: route %s from the last route assignment (not %s)", self._device, route,
                     self.terminal.config.route)
            self.terminal.config = dataclasses.replace(self.terminal.config, route=route)
        tickets = self._state.get("tickets")
        if tickets is not None:
            try:
                self.terminal.replace_ticket_params(TicketParams.from_dict(tickets))
            except ValueError as e:
                log.error("device %s: ticket keys in the downlink state unreadable (%s): none until the next "
                          "params package", self._device, e)
        for path in sorted(self.staging.glob("*.pkg")):
            try:
                payload = path.read_bytes()
                if self._stage(verify_package(payload, self.public_key), payload, path=path) is None:
                    path.unlink(missing_ok=True)  # overtaken by what is in force
            except (OSError, PackageError, _Refused) as e:
                # A staged file that no longer passes is dropped: the back office sends it again.
                log.error("device %s: staged package %s dropped: %s", self._device, path.name, e)
                path.unlink(missing_ok=True)

    @property
    def _device(self) -> str:
        return self.terminal.config.device_id

    # -- what status reports ----------------------------------------------------------------------------------

    @property
    def params_version(self) -> int:
        """The version of the last parameter package applied, 0 before any: the number the back office's
        rollout compares with what it sent (a fare table's own version is another numbering; counting it here
        would make a first package numbered like the local table look applied when it never was)."""
        return int(self._state.get("params_version", 0))

    @property
    def staged_software(self) -> str | None:
        return self._state.get("software_staged")

    def denylist_age(self, now: datetime | None = None) -> timedelta | None:
        at = self._state.get("denylist_at")
        if at is not None and self._state.get("denylist_version") == self.terminal.deny_list.version:
            since = datetime.fromisoformat(at)
        else:
            try:
                since = datetime.fromtimestamp(os.stat(self.deny_file).st_mtime, UTC)
            except OSError:
                return None  # no list ever received
        return (now or self.clock()) - since

    def alarms(self) -> tuple[str, ...]:
        out = []
        if self.denylist_max_age is not None:
            age = self.denylist_age()
            if age is None or age > self.denylist_max_age:
                out.append("denylist stale")
        with self._lock:
            out.extend(self._refused.values())
        staged = self.staged_software
        if staged and staged != self.software:
            out.append(f"software {staged} staged"[:_ALARM_LEN])
        return tuple(out)

    def pending(self) -> list[Package]:
        with self._lock:
            return [s.package for s in sorted(self._staged.values(), key=lambda s: s.order)]

    # -- MQTT thread ------------------------------------------------------------------------------------------

    def receive(self, message: str, payload: bytes, *, fleet: bool = False) -> Package | None:
        """A package arrived on ``.../<device or _fleet>/<message>``: check it and stage it. Returns the package
        staged (None if refused or not for us / nothing new). Never raises."""
        try:
            pkg = verify_package(payload, self.public_key)
        except PackageError as e:
            self._refuse(message if message in ("denylist", "params", "software") else "package",
                         f"refused {message}: {_short(e)}", f"package on {message} refused: {e}")
            return None
        try:
            if pkg.kind != message:
                raise _Refused(f"{pkg.kind} package on {message} topic")
            if not self._for_us(pkg):
                if fleet:  # another route's package on the fleet topic: simply not ours
                    log.debug("device %s: %s is not for us", self._device, pkg.describe())
                    return None
                raise _Refused(f"for {pkg.target}")
            return self._stage(pkg, bytes(payload))
        except _Refused as e:
            # One alarm per downlink topic: the latest refusal on it, until a package of that kind is applied.
            self._refuse(message, f"refused {message} {pkg.version}: {e}", f"{pkg.describe()} refused: {e}")
            return None
        except Exception as e:  # never let a package kill the network thread
            log.exception("device %s: %s could not be staged", self._device, pkg.describe())
            self._refuse(message, f"refused {message} {pkg.version}: {type(e).__name__}",
                         f"{pkg.describe()} could not be staged: {e}")
            return None

    def _for_us(self, pkg: Package) -> bool:
        return pkg.target in ("_fleet", self._device, f"route:{self.terminal.config.route}")

    def _stage(self, pkg: Package, payload: bytes, *, path: Path | None = None) -> Package | None:
        staged = _Staged(pkg, path or self.staging / f"{pkg.kind}-{pkg.version}.pkg")
        if pkg.kind == "denylist":
            if not self._check_denylist(pkg, staged):
                return None
        elif pkg.kind == "params":
            if pkg.number <= self.params_version and path is None:
                log.info("device %s: params %s ignored, %d is in force", self._device, pkg.version,
                         self.params_version)
                return None
            try:
                doc = parse_params(pkg.body)
                staged.fares = FareTable.from_dict(doc["fares"]) if "fares" in doc else None
            except (PackageError, FareError) as e:
                raise _Refused(_short(e)) from None
        elif pkg.version in (self.software, self.staged_software) and path is None:
            log.info("device %s: software %s already running or staged", self._device, pkg.version)
            return None
        with self._lock:
            if (pkg.kind, pkg.version) in self._staged and path is None:
                return None  # the same package again (QoS 1 redelivery)
            if path is None:
                replace_file(staged.path, payload)
            self._staged[(pkg.kind, pkg.version)] = staged
        log.info("device %s: %s staged, active from %s", self._device, pkg.describe(),
                 pkg.activate_at.isoformat())
        return pkg

    def _expected_denylist(self) -> int:
        """The version the deny list will have once every staged deny-list package is applied."""
        with self._lock:
            staged = [s.package.number for s in self._staged.values() if s.package.kind == "denylist"]
        return max([self.terminal.deny_list.version, *staged])

    def _check_denylist(self, pkg: Package, staged: _Staged) -> bool:
        body = pkg.body
        have = self._expected_denylist()
        if not body or body[:1] == b"{":
            # The back office's announcement of its current version (backoffice.publisher: a JSON body
            # {"version", "count", "checksum", "created_at"}, retained on _fleet/denylist): nothing to apply;
            # a bus behind says its version at once so the publisher sends its delta.
            if body:
                try:
                    announced = json.loads(body.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as e:
                    raise _Refused(f"bad announcement: {_short(e)}") from None
                if not isinstance(announced, dict) or announced.get("version") != pkg.number:
                    raise _Refused("announcement body does not match its version")
            if pkg.number > have:
                log.info("device %s: deny list %s announced, we have %d: reporting our version", self._device,
                         pkg.version, have)
                self._changed()
            return False
        if body[:4] == DELTA_MAGIC:
            try:
                delta = decode_delta(body)
            except DenyListError as e:
                raise _Refused(f"bad delta: {_short(e)}") from None
            if delta.new_version != pkg.number or delta.base_version != pkg.base_version:
                raise _Refused(f"delta {delta.base_version}->{delta.new_version} inside a package for "
                               f"{pkg.base_version}->{pkg.version}")
            if delta.new_version <= have:  # a copy come again (retained, redelivered): nothing new
                log.info("device %s: deny-list delta to %d ignored, we have %d", self._device, delta.new_version,
                         have)
                return False
            if delta.base_version != have:
                # "fetch the full list": the heartbeat this triggers tells the back office our version
                raise _Refused(f"delta from {delta.base_version}, have {have}")
            staged.delta = delta
            return True
        if body[:4] == LIST_MAGIC:
            try:
                full = DenyList.from_bytes(body)
            except DenyListError as e:
                raise _Refused(f"bad list: {_short(e)}") from None
            if full.version != pkg.number:
                raise _Refused(f"list version {full.version} in package {pkg.version}")
            if full.version <= have:
                log.info("device %s: deny list %d ignored, we have %d", self._device, full.version, have)
                return False
            staged.full = full
            return True
        raise _Refused(f"body is neither a list nor a delta ({body[:4]!r})")

    def _refuse(self, kind: str, alarm: str, detail: str) -> None:
        log.error("device %s: %s", self._device, detail)
        with self._lock:
            self._refused[kind] = alarm[:_ALARM_LEN].replace(";", ",")
            self.refusals += 1
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("device %s: status callback failed", self._device)

    # -- main loop, between taps ------------------------------------------------------------------------------

    def apply_due(self, now: datetime | None = None) -> list[Package]:
        """Apply every staged package whose activation time has come; call between taps only. Never raises."""
        now = now or self.clock()
        with self._lock:
            due = sorted((s for s in self._staged.values() if s.package.activate_at <= now), key=lambda s: s.order)
        done = []
        for staged in due:
            pkg = staged.package
            try:
                applied = self._apply(staged)
            except (DeltaRefused, DenyListError, FareError, OSError, ValueError) as e:
                self._refuse(pkg.kind, f"refused {pkg.kind} {pkg.version}: {_short(e)}",
                             f"{pkg.describe()} not applied: {e}")
                applied = False
            with self._lock:
                self._staged.pop((pkg.kind, pkg.version), None)
            staged.path.unlink(missing_ok=True)
            if applied:
                with self._lock:
                    self._refused.pop(pkg.kind, None)
                self.applied.append(f"{pkg.kind} {pkg.version}")
                done.append(pkg)
        if due:
            self._changed()
        return done

    def _apply(self, staged: _Staged) -> bool:
        pkg = staged.package
        if pkg.kind == "denylist":
            current = self.terminal.deny_list
            if staged.delta is not None:
                if staged.delta.base_version != current.version:
                    raise DeltaRefused(f"delta from {staged.delta.base_version}, have {current.version}")
                new = swap(self.deny_file, current, staged.delta)
            else:
                if staged.full.version <= current.version:
                    return False
                replace_file(self.deny_file, pkg.body)
                new = DenyList.load(self.deny_file, expect_checksum=staged.full.checksum)
            self.terminal.replace_deny_list(new)
            self._state.update(denylist_version=new.version, denylist_at=pkg.activate_at.isoformat())
        elif pkg.kind == "params":
            if pkg.number <= self._state.get("params_version", -1):
                return False
            doc = parse_params(pkg.body)
            if staged.fares is not None:
                if self.fares_file is not None:
                    replace_file(self.fares_file, json.dumps(staged.fares.to_dict(), indent=1).encode())
                self.terminal.replace_fares(staged.fares)
            if "tickets" in doc:
                self.terminal.replace_ticket_params(TicketParams.from_dict(doc["tickets"]))
                self._state["tickets"] = doc["tickets"]
            if "route" in doc and doc["route"] != self.terminal.config.route:
                log.info("device %s: route %s replaces %s", self._device, doc["route"], self.terminal.config.route)
                self.terminal.config = dataclasses.replace(self.terminal.config, route=doc["route"])
                self._state["route"] = doc["route"]
            self._state["params_version"] = pkg.number
        else:
            folder = self.staging / SOFTWARE_DIR
            tarball = folder / f"{pkg.version}.tar"
            replace_file(tarball, pkg.body)
            marker = {"version": pkg.version, "file": tarball.name, "sha256": hashlib.sha256(pkg.body).hexdigest(),
                      "activate_at": pkg.activate_at.isoformat()}
            replace_file(folder / MARKER, json.dumps(marker, sort_keys=True).encode())
            self._state["software_staged"] = pkg.version
            log.info("device %s: software %s staged for the next boot (%s)", self._device, pkg.version, tarball)
        self._save_state()
        log.info("device %s: %s applied", self._device, pkg.describe())
        return True


class _Refused(Exception):
    pass


_REASONS = (("signature", "bad signature"), ("SHA-256", "hash mismatch"), ("truncated", "truncated"),
            ("trailing", "trailing bytes"), ("unknown package kind", "unknown kind"), ("checksum", "checksum"))


def _short(e: Exception) -> str:
    """A reason short enough for a status alarm (the log line has the whole error)."""
    text = str(e)
    for needle, reason in _REASONS:
        if needle in text:
            return reason
    return text.split(": ", 1)[0][:40]

