"""SerialChannel over a real socat pty pair: framing, pacing, noise, timeouts, unplug and replug."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import serial
from pytest_mock import MockerFixture

from stations.codec import DecodeEvent, DecodeEventKind, Frame, encode_frame
from stations.simulator import PtyPair
from stations.transports import serial as serial_mod
from stations.transports.base import ChannelClosed
from stations.transports.serial import SerialChannel, latency_advice, latency_timer_of, wire_time


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[PtyPair]:
    pair = PtyPair(tmp_path / "a", tmp_path / "b").start()
    yield pair
    pair.stop()


@pytest.fixture
async def ends(pty_pair: PtyPair) -> AsyncIterator[tuple[SerialChannel, SerialChannel]]:
    a = await SerialChannel.open(pty_pair.a, frame_timeout=0.1)
    b = await SerialChannel.open(pty_pair.b, frame_timeout=0.1)
    yield a, b
    await a.close()
    await b.close()


async def next_frame(ch: SerialChannel, timeout: float = 2.0) -> tuple[Frame, list[DecodeEvent]]:
    events: list[DecodeEvent] = []
    async with asyncio.timeout(timeout):
        while True:
            item = await ch.recv()
            if isinstance(item, Frame):
                return item, events
            events.append(item)


async def test_frames_both_ways(ends: tuple[SerialChannel, SerialChannel]) -> None:
    a, b = ends
    big = bytes(random.Random(1).randrange(256) for _ in range(16384))
    await a.send(encode_frame(0x12, b"hello") + encode_frame(0x13, big))
    assert (await next_frame(b))[0] == Frame(0x12, b"hello")
    assert (await next_frame(b))[0] == Frame(0x13, big)
    await b.send(encode_frame(0x92, b"back"))
    assert (await next_frame(a))[0] == Frame(0x92, b"back")
    assert a.bytes_sent == b.bytes_received


@pytest.mark.parametrize("baud", [115200, 57600])
async def test_pacing_takes_wire_time(pty_pair: PtyPair, baud: int) -> None:
    a = await SerialChannel.open(pty_pair.a, baud, pace=True)
    b = await SerialChannel.open(pty_pair.b, baud)
    try:
        frames = [encode_frame(0x13, bytes(700)), encode_frame(0x12, bytes(400))]
        total = sum(map(len, frames))
        start = time.perf_counter()
        for f in frames:
            await a.send(f)
        for _ in frames:
            await next_frame(b)
        elapsed = time.perf_counter() - start
        expected = wire_time(total, baud)
        print(f"paced {total} bytes at {baud}: {elapsed * 1000:.1f} ms, wire time {expected * 1000:.1f} ms")
        # A lower bound on wire time, not a speed target.
        assert elapsed >= 0.9 * expected
    finally:
        await a.close()
        await b.close()


async def test_unpaced_is_not_wire_limited(ends: tuple[SerialChannel, SerialChannel]) -> None:
    a, b = ends
    frame = encode_frame(0x13, bytes(4000))
    start = time.perf_counter()
    await a.send(frame)
    await next_frame(b)
    assert time.perf_counter() - start < wire_time(len(frame), 115200)


async def test_frame_split_across_tiny_writes(ends: tuple[SerialChannel, SerialChannel]) -> None:
    a, b = ends
    frame = encode_frame(0x12, b"split into many one-to-three byte writes" * 3)
    rng = random.Random(7)
    pos = 0
    while pos < len(frame):
        n = rng.randint(1, 3)
        await a.send(frame[pos : pos + n])
        pos += n
        if rng.random() < 0.1:
            await asyncio.sleep(0.002)
    got, events = await next_frame(b)
    assert got.payload.startswith(b"split") and not events


async def test_noise_between_frames(ends: tuple[SerialChannel, SerialChannel]) -> None:
    a, b = ends
    rng = random.Random(3)
    noise = bytes(rng.choice([x for x in range(256) if x != 0xB1]) for _ in range(300))
    false_start = b"\xb1\xd5\x12\x00\x05\x00"  # SYNC with a wrong header check byte
    await a.send(
        noise + encode_frame(0x01, b"one") + false_start + noise[:50] + encode_frame(0x02, b"two") + noise
    )
    first, ev1 = await next_frame(b)
    second, ev2 = await next_frame(b)
    assert (first.payload, second.payload) == (b"one", b"two")
    kinds = {e.kind for e in ev1 + ev2}
    assert DecodeEventKind.GARBAGE in kinds and DecodeEventKind.BAD_HEADER in kinds
    # The trailing noise is skipped too, and the line keeps working.
    await a.send(encode_frame(0x03, b"three"))
    assert (await next_frame(b))[0].payload == b"three"


async def test_truncated_frame_then_silence(ends: tuple[SerialChannel, SerialChannel]) -> None:
    a, b = ends
    frame = encode_frame(0x12, bytes(200))
    await a.send(frame[:100])
    await asyncio.sleep(0.25)  # frame_timeout is 0.1 s
    await a.send(encode_frame(0x13, b"next"))
    got, events = await next_frame(b)
    assert got.payload == b"next"
    assert any(e.kind is DecodeEventKind.TIMEOUT for e in events)


async def test_truncated_frame_expires_while_idle(ends: tuple[SerialChannel, SerialChannel]) -> None:
    a, b = ends
    await a.send(encode_frame(0x12, bytes(50))[:20])
    async with asyncio.timeout(1.0):
        item = await b.recv()  # nothing else arrives: the decoder's own timeout must fire
    assert isinstance(item, DecodeEvent) and item.kind is DecodeEventKind.TIMEOUT


async def test_unplug_mid_frame_then_replug(pty_pair: PtyPair) -> None:
    a = await SerialChannel.open(pty_pair.a)
    b = await SerialChannel.open(pty_pair.b)
    frame = encode_frame(0x12, bytes(300))
    await a.send(frame[:150])
    reader = asyncio.create_task(b.recv())
    await asyncio.sleep(0.05)
    pty_pair.kill()  # the cable is pulled mid-frame
    with pytest.raises(ChannelClosed):
        async with asyncio.timeout(2.0):
            await reader
    with pytest.raises(ChannelClosed):
        await a.send(frame[150:])
    with pytest.raises(ChannelClosed):
        await b.recv()  # stays closed; no crash, no partial frame
    assert b.closed and a.closed

    pty_pair.start()  # plugged back in: same names
    a2 = await SerialChannel.open(pty_pair.a)
    b2 = await SerialChannel.open(pty_pair.b)
    try:
        await a2.send(frame)
        assert (await next_frame(b2))[0] == Frame(0x12, bytes(300))
    finally:
        await a2.close()
        await b2.close()


async def test_open_missing_port_is_channel_closed(tmp_path: Path) -> None:
    with pytest.raises(ChannelClosed):
        await SerialChannel.open(str(tmp_path / "nope"))
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    with pytest.raises(ChannelClosed):
        await SerialChannel.open(str(tmp_path / "dangling"))


async def test_close_wakes_a_waiting_reader(ends: tuple[SerialChannel, SerialChannel]) -> None:
    _a, b = ends
    reader = asyncio.create_task(b.recv())
    await asyncio.sleep(0.02)
    await b.close()
    with pytest.raises(ChannelClosed):
        async with asyncio.timeout(1.0):
            await reader


async def test_a_path_that_is_not_a_character_device_is_never_opened(tmp_path: Path) -> None:
    """A serial port configured onto a database file must not be opened: closing any descriptor of a SQLite file
    drops every POSIX lock this process holds on it, so even a failed open would break the journal's locking."""
    import sqlite3
    import subprocess
    import sys

    db = tmp_path / "journal.sqlite"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("BEGIN IMMEDIATE")  # this process holds the write lock
    conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(ChannelClosed, match="not a serial device"):
        await SerialChannel.open(str(db))
    other = subprocess.run(
        [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0);"
         " c.execute('BEGIN IMMEDIATE')", str(db)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert other.returncode != 0 and "locked" in other.stderr, "the write lock was lost"
    conn.execute("COMMIT")
    with pytest.raises(ChannelClosed, match="not a serial device"):
        await SerialChannel.open(str(tmp_path))  # a directory


async def test_pacing_lateness_is_counted(pty_pair: PtyPair, mocker: MockerFixture) -> None:
    """A bench charges the fixture's late timers to the appliance; the channel must say how late they were."""
    a = await SerialChannel.open(pty_pair.a, 115200, pace=True)
    b = await SerialChannel.open(pty_pair.b, 115200, pace_reads=True)
    try:
        frames = [encode_frame(0x13, bytes(300)), encode_frame(0x12, bytes(200))]
        for f in frames:
            await a.send(f)
        for _ in frames:
            await next_frame(b)
        assert a.pace_events == 2  # one per paced frame written
        assert b.pace_events >= 1  # one per paced read
        assert a.pace_late_s >= 0 and b.pace_late_s >= 0
        # Late timers, injected: every pacing sleep overshoots by 30 ms.
        real_sleep = asyncio.sleep

        async def late_sleep(delay: float) -> None:
            await real_sleep(delay + 0.03)

        mocker.patch("stations.transports.serial.asyncio.sleep", late_sleep)
        late_a, events_a, late_b, events_b = a.pace_late_s, a.pace_events, b.pace_late_s, b.pace_events
        # One whole pacing slice (57 bytes, 4.9 ms of line): later slices of a longer frame would catch up on
        # the schedule, and a shorter one leaves less time for the sleep to be due at all.
        await a.send(encode_frame(0x12, bytes(47)))
        await next_frame(b)
        assert a.pace_events == events_a + 1 and a.pace_late_s - late_a >= 0.029
        assert b.pace_events > events_b and b.pace_late_s - late_b >= 0.029
    finally:
        await a.close()
        await b.close()


async def test_unpaced_channel_counts_no_pacing(ends: tuple[SerialChannel, SerialChannel]) -> None:
    a, b = ends
    await a.send(encode_frame(0x12, b"x"))
    await next_frame(b)
    assert (a.pace_events, b.pace_events, a.pace_late_s, b.pace_late_s) == (0, 0, 0.0, 0.0)


def fake_latency_timer(sysfs: Path, port: str | Path, text: str) -> Path:
    """A sysfs latency_timer file for the device behind ``port`` (by its device number, as the kernel shows it)."""
    rdev = os.stat(port).st_rdev
    timer = sysfs / "dev" / "char" / f"{os.major(rdev)}:{os.minor(rdev)}" / "device" / "latency_timer"
    timer.parent.mkdir(parents=True, exist_ok=True)
    timer.write_text(text)
    return timer


async def test_open_reads_the_adapters_latency_timer(
    pty_pair: PtyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sysfs = tmp_path / "sys"
    monkeypatch.setattr(serial_mod, "SYSFS", str(sysfs))
    plain = await SerialChannel.open(pty_pair.b)
    assert plain.usb_latency_ms is None  # a pty shows no timer
    await plain.close()
    timer = fake_latency_timer(sysfs, pty_pair.a, "16\n")
    ch = await SerialChannel.open(pty_pair.a)  # through the link: the device behind it is what counts
    try:
        assert ch.usb_latency_ms == 16 and ch.latency_timer_file == str(timer)
        assert latency_timer_of(ch._fd) == 16
        timer.write_text("sixteen")
        assert latency_timer_of(ch._fd) is None
        timer.write_text("1\n")
        assert latency_timer_of(ch._fd) == 1
    finally:
        await ch.close()


async def test_a_driver_refusing_low_latency_mode_does_not_stop_the_port(
    pty_pair: PtyPair, mocker: MockerFixture
) -> None:
    """Open asks for low-latency mode (ftdi_sio: a 1 ms timer); a driver that refuses it, as most do, is no error."""
    ask = mocker.patch.object(serial.Serial, "set_low_latency_mode", side_effect=ValueError("not supported"))
    a = await SerialChannel.open(pty_pair.a)
    b = await SerialChannel.open(pty_pair.b)
    try:
        assert [c.args for c in ask.call_args_list] == [(True,), (True,)]
        await a.send(encode_frame(0x12, b"still works"))
        assert (await next_frame(b))[0] == Frame(0x12, b"still works")
    finally:
        await a.close()
        await b.close()


def test_latency_advice() -> None:
    where = "/sys/dev/char/188:0/device/latency_timer"
    assert latency_advice("st", "/dev/ttyUSB0", None, 115200, where) is None
    assert latency_advice("st", "/dev/ttyUSB0", 1, 115200, where) is None
    advice = latency_advice("st", "/dev/ttyUSB0", 16, 115200, where)
    # At worst 16 ms on each of ENROLL and CONFIRM against 156 ms of frames: 32 / 188.
    assert advice is not None and "up to 16 ms" in advice and "17%" in advice
    assert f"echo 1 > {where}" in advice
    slower = latency_advice("st", "/dev/ttyUSB0", 16, 57600, where)
    assert slower is not None and "9%" in slower  # the same wait is less of a slower line
