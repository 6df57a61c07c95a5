"""Reader backends, chosen by a path string as in nfcpy. One front end (``open_reader``), four backends:

| path | backend | library |
|---|---|---|
| ``sim:`` | an in-process reader you ``present()`` hardware_sim cards to | none |
| ``pcsc:<reader name, or index, or empty for the first>`` | a PC/SC reader through pcscd | pyscard |
| ``nfc:<nfcpy path>``, e.g. ``nfc:usb``, ``nfc:udp:127.0.0.1:50000`` | an NFC reader, ISO-DEP (Type 4A) cards | nfcpy |
| ``rfid24:<serial device>[?baud=115200&timeout=0.5&retries=2]`` | a 2.45 GHz RFID-SIM module on a UART | pyserial |
| ``qr:<serial device>[?baud=9600]`` | not a card reader: the bus's 2D (QR) scanner for e-tickets, beside one of the above (``--scanner``; validator.readers.qr, each code's text ending in CR) | pyserial |

Each backend's library is imported only when that backend is opened, so a validator with only an RFID-SIM
module needs neither pcscd nor nfcpy. Every backend raises only ``ReaderError`` and its subclasses: ``CardRemoved``
once the card has gone (and on every later ``exchange`` of that session), ``CommunicationError`` when the reader or
the link to it fails.
"""

from __future__ import annotations

from validator.readers.base import CardRemoved, CardSession, CommunicationError, Reader, ReaderError

SCHEMES = ("sim", "pcsc", "nfc", "rfid24")


def open_reader(path: str) -> Reader:
    scheme, sep, rest = path.partition(":")
    if not sep:
        raise ReaderError(f"reader path {path!r} has no scheme: give one of {', '.join(s + ':' for s in SCHEMES)}")
    if scheme == "sim":
        from validator.readers.sim import SimReader

        return SimReader()
    if scheme == "pcsc":
        from validator.readers.pcsc import PcscReader

        return PcscReader(rest)
    if scheme == "nfc":
        from validator.readers.nfc import NfcReader

        return NfcReader(rest)
    if scheme == "rfid24":
        from validator.readers.rfid24 import Rfid24Reader

        return Rfid24Reader(rest)
    raise ReaderError(f"unknown reader path {path!r}: this build knows {', '.join(s + ':' for s in SCHEMES)}")


__all__ = ["CardRemoved", "CardSession", "CommunicationError", "Reader", "ReaderError", "open_reader"]
