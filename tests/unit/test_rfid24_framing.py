"""The rfid24 frame profile (validator/readers/rfid24.py): ``02 | LEN(2) | CMD(2) DATA | BCC | 03`` with LEN over
CMD + DATA and BCC the XOR of LEN, CMD and DATA; and a scanner that finds good frames in any noise."""

from __future__ import annotations

import pytest

from validator.readers import ReaderError
from validator.readers.rfid24 import MAX_LEN, FrameScanner, Rfid24Options, bcc, encode_frame


def test_a_get_balance_frame_byte_for_byte():
    frame = encode_frame(bytes.fromhex("A233") + bytes.fromhex("805C000204"))
    # LEN = 2 (CMD) + 5 (APDU) = 7; BCC = 00^07^A2^33^80^5C^00^02^04
    assert frame.hex() == "020007a233805c000204" + f"{0x07 ^ 0xA2 ^ 0x33 ^ 0x80 ^ 0x5C ^ 0x02 ^ 0x04:02x}" + "03"
    assert frame[-2] == bcc(frame[1:-2])


def test_body_length_limits():
    with pytest.raises(ValueError):
        encode_frame(b"\xa2")
    with pytest.raises(ValueError):
        encode_frame(b"\xa2\x33" + bytes(MAX_LEN))
    assert len(encode_frame(b"\xa2\x33" + bytes(MAX_LEN - 2))) == MAX_LEN + 5


def scan(data: bytes, chunk: int | None = None) -> tuple[list[bytes], FrameScanner]:
    s, out = FrameScanner(), []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        s.feed(data[i:i + step])
        while (body := s.next_frame()) is not None:
            out.append(body)
    return out, s


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_frames_are_found_across_noise_and_any_split(chunk):
    a = encode_frame(b"\xa2\x33\x00\x90\x00")
    b = encode_frame(b"\xa2\x31\x00" + bytes(range(8)))
    noise = b"\x02\xff\xff\x02\x00\x05\x11\x03\x02"  # 02s, an impossible length, a start that never completes
    bodies, _ = scan(noise + a + b"\x00\x02" + b + noise[:3], chunk)
    assert bodies == [a[3:-2], b[3:-2]]


def test_a_data_byte_02_inside_a_frame_does_not_split_it():
    body = b"\xa2\x33" + bytes([0x02, 0x00, 0x02, 0x03, 0x02]) + b"\x90\x00"
    assert scan(encode_frame(body), 1)[0] == [body]


def test_a_bad_bcc_is_reported_and_no_frame_returned():
    frame = bytearray(encode_frame(b"\xa2\x33\x00\x90\x00"))
    frame[-2] ^= 0x55
    bodies, s = scan(bytes(frame))
    assert bodies == [] and s.bad_bcc and s.damaged


def test_a_good_frame_after_noise_that_looks_like_a_long_frame_start():
    # 02 00 40 announces 64 bytes that never come; the good frame behind it must not wait for them
    good = encode_frame(b"\xa2\x33\x00\x62\x83")
    bodies, _ = scan(b"\x02\x00\x40" + good)
    assert bodies == [good[3:-2]]


def test_cut_short_frame_counts_as_damaged():
    bodies, s = scan(encode_frame(b"\xa2\x33\x00\x90\x00")[:-3])
    assert bodies == [] and s.damaged and not s.bad_bcc


def test_reader_path_options():
    o = Rfid24Options.parse("/dev/ttyS1?baud=9600&timeout=0.2&retries=4")
    assert (o.device, o.baud, o.timeout, o.retries) == ("/dev/ttyS1", 9600, 0.2, 4)
    assert Rfid24Options.parse("/dev/ttyUSB0").baud == 115200
    for bad in ("", "?baud=1", "/dev/x?speed=1", "/dev/x?baud=fast"):
        with pytest.raises(ReaderError):
            Rfid24Options.parse(bad)
