"""validator.printer and hardware_sim.printer: the exact ESC/POS bytes of a slip, pinned here; the simulated printer
decoding them from a pty even when a command arrives cut in two; printer and keypad paths refused with a reason;
the console keypad's keys."""

from __future__ import annotations

import os
import time

import pytest

from hardware_sim.keypad import SimKeypad
from hardware_sim.printer import SimPrinter
from validator.driver_menu import ConsoleKeypad, KeypadError, SerialKeypad, open_keypad
from validator.printer import PrinterError, open_printer, slip_bytes


def test_a_slip_is_init_chinese_mode_gb18030_lines_feed_and_cut():
    assert slip_bytes("合计 Total 2.00\nOK\n") == (
        b"\x1b@" + b"\x1c&" + "合计".encode("gb18030") + b" Total 2.00\n" + b"OK\n" + b"\x1bd\x04" + b"\x1dV\x01")
    assert "合计".encode("gb18030") == bytes.fromhex("bacf bcc6".replace(" ", ""))


def test_the_simulated_printer_decodes_slips_cut_anywhere():
    with SimPrinter() as printer:
        fd = os.open(printer.path, os.O_WRONLY | os.O_NOCTTY)
        try:
            data = slip_bytes("班次 Shift 3\n合计 Total 9.00") + b"\x1ba\x01" + slip_bytes("second")[:-1]
            os.write(fd, data[:1] + b"")  # ESC alone: the rest follows
            os.write(fd, data[1:7])
            os.write(fd, data[7:])
            first = printer.wait_for_slips(1)[0]
            assert first == "班次 Shift 3\n合计 Total 9.00\n"
            os.write(fd, b"\x01" + b"\x1d(\x02")  # the last byte of the cut, then a command it does not know
            assert printer.wait_for_slips(2)[1] == "second\n"
        finally:
            os.close(fd)
    assert printer.unknown == [b"\x1d("]


@pytest.mark.parametrize("path", ["", "lp0", "usb:1", "serial:", "serial:/dev/ttyS9?baud=fast"])
def test_printer_paths_are_refused_with_a_reason(path):
    with pytest.raises(PrinterError, match="printer path"):
        open_printer(path)


def test_a_printer_that_cannot_be_opened_is_logged_not_raised(caplog):
    printer = open_printer("serial:/dev/farebox-no-such-printer")
    printer.print_slip("lost")
    printer.close()
    assert "slip not printed" in caplog.text and "no-such-printer" in caplog.text
    assert (printer.printed, printer.failed) == (0, 1)


def test_keypads_by_path():
    with pytest.raises(KeypadError, match="console: or serial:"):
        open_keypad("gpio:17")
    with pytest.raises(KeypadError, match="no-such-keypad"):
        open_keypad("serial:/dev/farebox-no-such-keypad")
    with SimKeypad() as sim:
        keypad = open_keypad(f"serial:{sim.path}?baud=9600")
        assert isinstance(keypad, SerialKeypad)
        sim.press("4")
        sim.press("12#")
        got = ""
        for _ in range(200):  # the pty has the bytes already; a loaded machine may take a moment
            got += keypad.read()
            if len(got) == 4:
                break
            time.sleep(0.01)
        keypad.close()
        assert got == "412#"
        with pytest.raises(ValueError, match="no key"):
            sim.press("E")


def test_the_console_keypad_reads_what_is_typed_and_enter_is_hash():
    read, write = os.pipe()
    try:
        keypad = ConsoleKeypad(read)
        assert keypad.read() == ""  # nothing typed: no wait
        os.write(write, b"4 12\na")
        assert keypad.read() == "4 12#A"
    finally:
        os.close(read)
        os.close(write)
