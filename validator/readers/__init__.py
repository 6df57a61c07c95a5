"""Reader backends, chosen by a path string as in nfcpy: ``sim:`` now; ``pcsc:``, ``nfc:`` and ``rfid24:`` follow."""

from __future__ import annotations

from validator.readers.base import CardRemoved, CardSession, CommunicationError, Reader, ReaderError


def open_reader(path: str) -> Reader:
    scheme, _, _rest = path.partition(":")
    if scheme == "sim":
        from validator.readers.sim import SimReader

        return SimReader()
    raise ReaderError(f"unknown reader path {path!r}: this build knows 'sim:'")


__all__ = ["CardRemoved", "CardSession", "CommunicationError", "Reader", "ReaderError", "open_reader"]
