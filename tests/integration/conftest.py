"""Fixtures for the reader backends against real daemons and devices: pcscd with vsmartcard's vpcd driver, nfcpy's
udp driver on a free port, RFID-SIM modules on ptys.

| fixture | scope | gives |
|---|---|---|
| ``pcsc_vpcd`` | session | names of the two farebox vpcd readers in a running pcscd (ports 0x9C40, 0x9C41) |
| ``free_udp_port`` | function | a UDP port nothing on 127.0.0.1 uses right now |
| ``rfid24_module`` | function | a started ``hardware_sim.rfid24_module.Rfid24Module``, closed after |
| ``card_rig`` | function | ``card_rig(backend)`` -> a ``CardRig`` for sim / pcsc / nfc / rfid24 |

pcscd: ``scripts/ensure-services.sh`` (``make test``) starts it with farebox's vpcd readers. When pytest runs on its
own and no pcscd runs at all, the ``pcsc_vpcd`` fixture starts one for the session (root only) and stops it after.
A pcscd that runs without farebox's readers is not touched here (it may serve someone's real reader): the tests
then skip, or fail under FAREBOX_REQUIRE_SERVICES=1, saying to run the script, which restarts it with them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from hardware_sim.vpcd import DEFAULT_PORT, PCSCD_READER_CONF, READER_NAME, VpcdCard, reader_name, settle_vpcd
from validator.readers import open_reader

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
DEBIAN_VPCD_NAME = "Virtual PCD"  # the reader entry vsmartcard-vpcd installs in /etc/reader.conf.d/vpcd


def _service_missing(reason: str):
    """As tests/conftest.py: skip, or fail when CI requires every service (FAREBOX_REQUIRE_SERVICES=1)."""
    if os.environ.get("FAREBOX_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (CI requires it)", pytrace=False)
    pytest.skip(reason)


def _pcsc_readers() -> list[str] | None:
    """pcscd's reader names, or None when no pcscd answers."""
    from smartcard import scard as s

    hr, ctx = s.SCardEstablishContext(s.SCARD_SCOPE_USER)
    if hr != s.SCARD_S_SUCCESS:
        return None
    try:
        hr, names = s.SCardListReaders(ctx, [])
        return list(names) if hr == s.SCARD_S_SUCCESS else []
    finally:
        s.SCardReleaseContext(ctx)


def _ours(names: list[str] | None) -> list[str]:
    return sorted(n for n in names or [] if n.startswith(READER_NAME))


@pytest.fixture(scope="session")
def pcsc_vpcd(tmp_path_factory):
    names = _pcsc_readers()
    rivals = [n for n in names or [] if n.startswith(DEBIAN_VPCD_NAME)]
    if rivals:  # see scripts/ensure-services.sh: two vpcd reader entries share the driver's slots and cross requests
        _service_missing(f"pcscd also runs Debian's vpcd reader entry ({rivals}), which takes over the slots of "
                         "farebox's vpcd readers: run scripts/ensure-services.sh, which disables it and restarts pcscd")
    if len(_ours(names)) >= 2:
        yield _ours(names)
        return
    if names is not None:
        _service_missing(f"pcscd runs without farebox's vpcd readers (it has {names}): run "
                         "scripts/ensure-services.sh, which restarts it with them")
    pcscd = shutil.which("pcscd") or "/usr/sbin/pcscd"
    if os.geteuid() != 0 or not os.path.exists(pcscd) or not VPCD_DRIVER.exists():
        _service_missing("pcscd with vsmartcard-vpcd is not running: run scripts/ensure-services.sh "
                         "(installs pcscd vsmartcard-vpcd and starts it)")
    conf = tmp_path_factory.mktemp("pcscd")
    (conf / "farebox-vpcd").write_text(PCSCD_READER_CONF)
    log = (conf / "pcscd.log").open("wb")
    proc = subprocess.Popen([pcscd, "-f", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while len(_ours(_pcsc_readers())) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _service_missing(f"started pcscd but its vpcd readers did not appear: see {conf / 'pcscd.log'}")
        time.sleep(0.1)
    try:
        yield _ours(_pcsc_readers())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rfid24_module():
    from hardware_sim.rfid24_module import Rfid24Module

    module = Rfid24Module()
    yield module
    module.close()


class CardRig:
    """One backend with its simulated device: ``present(card)`` puts a card in the field, ``remove()`` takes it
    out, ``reader`` is the validator's reader opened with ``open_reader(path)``, exactly as on a bus."""

    def __init__(self, backend: str, *, udp_port: int = 0, pcsc_port: int = DEFAULT_PORT, module=None):
        self.backend = backend
        self._vpcd: VpcdCard | None = None
        self._nfc = None
        self._module = module
        self._pcsc_port = pcsc_port
        if backend == "sim":
            self.path = "sim:"
        elif backend == "pcsc":
            self.path = f"pcsc:{reader_name(pcsc_port)}"
        elif backend == "nfc":
            self.path = f"nfc:udp:127.0.0.1:{udp_port}"
        elif backend == "rfid24":
            self.path = f"rfid24:{module.path}"
        else:
            raise ValueError(backend)
        self.reader = open_reader(self.path)

    def present(self, card) -> None:
        if self.backend == "sim":
            self.reader.present(card)
        elif self.backend == "pcsc":
            # pcscd has powered *this* card (not another process's in the same vpcd port) and the reader shows it
            self._vpcd = VpcdCard(card, port=self._pcsc_port)
            self._vpcd.insert()
            try:
                settle_vpcd(self.reader, card=self._vpcd)
            except ConnectionError:
                self._vpcd.remove()
                self._vpcd = None
                raise
        elif self.backend == "nfc":
            if self._nfc is None:
                from hardware_sim.nfc_card import NfcCard

                self._nfc = NfcCard(card, int(self.path.rsplit(":", 1)[1])).start()
            else:
                self._nfc.present(card)
        else:
            self._module.present(card)

    def remove(self) -> None:
        if self.backend == "sim":
            self.reader.remove()
        elif self.backend == "pcsc":
            if self._vpcd is not None:
                self._vpcd.remove()
                self._vpcd = None
                # a card is pulled out for longer than pcscd's presence poll; wait until pcscd has seen it go
                deadline = time.monotonic() + 5
                while not self.reader.card_gone(200) and time.monotonic() < deadline:
                    pass
        elif self.backend == "nfc":
            if self._nfc is not None:
                self._nfc.remove()
        else:
            self._module.remove()

    def tap(self, terminal, card, timeout: float = 5.0):
        self.present(card)
        try:
            session = self.reader.poll(timeout)
            assert session is not None, f"{self.path}: no card seen within {timeout} s"
            return terminal.tap(session)
        finally:
            self.remove()

    def close(self) -> None:
        self.remove()
        if self._nfc is not None:
            self._nfc.stop()
        self.reader.close()


@pytest.fixture
def card_rig(request, free_udp_port):
    rigs = []

    def make(backend: str, **kwargs) -> CardRig:
        if backend == "pcsc":
            request.getfixturevalue("pcsc_vpcd")
        if backend == "rfid24" and "module" not in kwargs:
            kwargs["module"] = request.getfixturevalue("rfid24_module")
        rig = CardRig(backend, udp_port=free_udp_port, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()
