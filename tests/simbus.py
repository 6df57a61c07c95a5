"""A validator wired as on a bus, for tests that need one: a SimReader in front, a PSAM in its slot, a real
journal on disk, a real uplink (wire.codec v2, MAC'd with the device key derived from the published TEST device
master), optionally a downlink (signed packages staged under tmp_path, applied before each tap as the main loop
does), 20 rider cards with deep pockets and a driver card."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from epurse.cardtypes import CardType
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam
from validator.downlink import Downlink
from validator.fares import FareTable
from validator.journal import Journal
from validator.messages import Outcome
from validator.readers.sim import SimReader
from validator.terminal import Terminal, TerminalConfig
from validator.uplink import Uplink
from wire import devicekeys
from wire.packages import TEST_PUBLIC_KEY

TERMINAL = bytes.fromhex("010000000777")
TODAY = date.today()


class Bus:
    """One validator wired as on a bus: SimReader in front, a PSAM in its slot, a journal, an uplink."""

    def __init__(self, tmp_path, target, operator: str, device: str, *, downlink: bool = False,
                 heartbeat_seconds: float = 60.0, denylist_max_age=None, software: str = "1.0.0"):
        self.clock_now = datetime(2026, 5, 1, 6, 0, tzinfo=UTC)
        slot = SimReader()
        slot.present(SimPsam(TERMINAL, keys=TEST_ISSUER_KEYS))
        self.journal = Journal(tmp_path / f"{device}.journal")
        self.terminal = Terminal(TerminalConfig(device_id=device, operator=operator, route="r1", vehicle="b1"),
                                 journal=self.journal, psam=slot.poll(), fares=FareTable(1, {"r1": 200}),
                                 clock=lambda: self.clock_now)
        self.reader = SimReader()
        self.mac_key = devicekeys.mac_key(devicekeys.TEST_DEVICE_MASTER, device)
        self.downlink = None
        if downlink:
            self.downlink = Downlink(self.terminal, public_key=TEST_PUBLIC_KEY, staging_dir=tmp_path / "staging",
                                     deny_file=tmp_path / "denylist.bin", fares_file=tmp_path / "fares.json",
                                     software=software, denylist_max_age=denylist_max_age)
        self.uplink = Uplink(self.journal, target, device_id=device, operator=operator, mac_key=self.mac_key,
                             terminal=self.terminal, downlink=self.downlink, software=software,
                             heartbeat_seconds=heartbeat_seconds, ack_timeout=1.0, max_backoff=2.0)
        self.driver = SimCard(bytes.fromhex("99990000000000000001"), CardType.DRIVER, 0, staff_no="D7",
                              start=TODAY - timedelta(days=400), end=TODAY + timedelta(days=400))
        self.riders = [SimCard(bytes.fromhex(f"9999{n:016d}"), CardType.ADULT, 1_000_000,
                               start=TODAY - timedelta(days=400), end=TODAY + timedelta(days=400))
                       for n in range(1, 21)]

    def between_taps(self) -> list:
        """What ValidatorApp does before waiting for the next card: apply the packages whose time has come."""
        return self.downlink.apply_due() if self.downlink is not None else []

    def tap(self, card) -> Outcome:
        self.clock_now += timedelta(seconds=40)
        self.between_taps()
        self.reader.present(card)
        result = self.terminal.tap(self.reader.poll())
        self.reader.remove()
        self.uplink.notify(self.clock_now)
        return result.outcome

    def ride(self, n: int) -> None:
        for i in range(n):
            assert self.tap(self.riders[i % len(self.riders)]) is Outcome.PAID
