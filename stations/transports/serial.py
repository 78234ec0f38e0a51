"""FrameChannel over a serial port (pyserial), for both the fixture and the appliance.

Ports are named by path. In production use ``/dev/serial/by-path/...``: it names the physical port (the USB
socket or the UART), so a station stays bound to the cable it is plugged into. Do **not** use
``/dev/serial/by-id/...``: those names are built from strings the USB device reports about itself
(vendor, product, serial number), so any device can claim another's name. Any path works (tests use the
symlinks of a socat pty pair).

Nothing here blocks the event loop: the port is opened non-blocking, its file descriptor is watched with
``loop.add_reader``/``add_writer``, and the bytes are moved with non-blocking reads and writes. Every way a
port can go away (unplugged USB adapter, EIO on a pty whose other end closed, the device node vanishing)
surfaces as ``ChannelClosed``; pyserial's exceptions and ``OSError`` are mapped in one place.

``pace=True`` paces writes to the line rate (8N1: 10 bit-times per byte at ``baud``), because a pty pair
delivers bytes as fast as the kernel copies them: a test or benchmark that means a real line then gets real
wire time. ``pace_reads=True`` also releases received bytes no sooner than the line would have delivered
them, which models the other direction's wire when the peer does not pace (e.g. a simulated fixture talking
to an appliance that opened its end unpaced).

A USB serial adapter may hold received bytes back: an FTDI chip passes them to the host when a USB packet fills
(62 data bytes on full-speed chips) or when its latency timer runs out, 16 ms unless set lower, so a frame's
last bytes can wait up to that long. At worst, 16 ms on each of a device's ENROLL and CONFIRM is a sixth of a
station's line rate at 115200 baud (one request at a time; about a tenth pipelined). ``open`` asks the driver
for low-latency mode (ftdi_sio then uses 1 ms) and reads back the timer of the adapter behind the port,
``usb_latency_ms``: None when the port shows none (an on-board UART, a CDC-ACM device, a pty, the oldest FTDI
chips, whose 16 ms is fixed). The appliance's udev rules also set 1 ms on FTDI adapters as they are plugged in,
and the daemon warns about a port where the timer is still higher.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import stat
import time
from typing import Any

import serial

from stations.codec import DecodeEvent, Frame, FrameDecoder
from stations.transports.base import ChannelClosed

SYSFS = "/sys"  # where latency_timer_of looks; a test points it at a tree of its own
READ_CHUNK = 4096  # at most this many bytes per read; the decoder's buffer is bounded on its own
BITS_PER_BYTE = 10  # 8N1: start bit, 8 data bits, stop bit
PACE_SLICE = 0.005  # pacing granularity: write at most ~5 ms of line time at once


def latency_timer_path(fd: int) -> str:
    """Where the kernel shows the latency timer of the USB serial adapter behind the open port ``fd``: found by
    the descriptor's device number, so it is the port this process has open whatever its path's links say."""
    rdev = os.fstat(fd).st_rdev
    return os.path.join(SYSFS, "dev", "char", f"{os.major(rdev)}:{os.minor(rdev)}", "device", "latency_timer")


def latency_timer_of(fd: int) -> int | None:
    """The latency timer, in ms, of the USB serial adapter behind the open port ``fd``; None when the port shows
    none or it cannot be read."""
    try:
        with open(latency_timer_path(fd), "rb") as f:
            text = f.read(16)
    except (OSError, ValueError):
        return None
    return int(text) if text.strip().isdigit() else None


def latency_advice(station: str, path: str, ms: int | None, baud: int, where: str) -> str | None:
    """What to tell the operator about a port whose adapter holds received bytes back for more than 1 ms (None
    when it does not); ``where`` is the sysfs file to write. The share of the line rate is the worst case: a
    device's usual 1,800 frame bytes both ways, one request at a time, ENROLL and CONFIRM each waiting the whole
    timer."""
    if ms is None or ms <= 1:
        return None
    lost = 2 * ms / 1000 / (wire_time(1800, baud) + 2 * ms / 1000)
    return (
        f"station {station}: the USB serial adapter behind {path} holds received bytes up to {ms} ms before"
        f" passing them on (its latency timer; the driver did not take low-latency mode): at worst about"
        f" {lost:.0%} of the station's line rate at {baud} baud, about half that with a pipelining fixture. The"
        " udev rule 70-birthline-stations.rules sets 1 ms on FTDI adapters as they are plugged in; for this one,"
        f" as root: echo 1 > {where}"
    )


def wire_time(nbytes: int, baud: int) -> float:
    """Seconds an 8N1 line at ``baud`` needs for ``nbytes``."""
    return nbytes * BITS_PER_BYTE / baud


class SerialChannel:
    """A framed channel on one serial port. Create with ``await SerialChannel.open(path, baud)``."""

    def __init__(
        self,
        port: Any,
        *,
        path: str,
        baud: int,
        pace: bool = False,
        pace_reads: bool = False,
        decoder: FrameDecoder | None = None,
    ) -> None:
        self._port = port
        self._path = path
        self.baud = baud
        self.pace = pace
        self.pace_reads = pace_reads
        self._fd: int = port.fileno()
        self._decoder = decoder or FrameDecoder()
        self._pending: collections.deque[Frame | DecodeEvent] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._send_lock = asyncio.Lock()
        self._tx_free = 0.0  # loop time at which the (simulated) transmit line is idle again
        self._rx_free = 0.0
        self._last_rx = 0.0  # monotonic time of the last byte received
        self._closed = False
        self._waiters: set[asyncio.Future[None]] = set()
        self.bytes_sent = 0
        self.bytes_received = 0
        # How late this process's timers let paced bytes go (a real UART is never late): the sum over every
        # paced frame written and every paced read, and how many there were. A bench prints it.
        self.pace_late_s = 0.0
        self.pace_events = 0
        # The adapter's latency timer (ms) as read after open asked for low-latency mode (None: none shown), and
        # the sysfs file it was read from.
        self.usb_latency_ms: int | None = None
        self.latency_timer_file = ""

    @classmethod
    async def open(
        cls,
        path: str,
        baud: int = 115200,
        *,
        pace: bool = False,
        pace_reads: bool = False,
        frame_timeout: float | None = None,
    ) -> SerialChannel:
        """Open ``path`` (a device path, or a pyserial URL that has a file descriptor) at ``baud`` 8N1.

        Raises ChannelClosed when the port cannot be opened (absent, busy, not a tty)."""
        if baud <= 0:
            raise ValueError("baud must be positive")
        if "://" not in path:
            _require_character_device(path)
        try:
            port = serial.serial_for_url(
                path,
                baudrate=baud,
                bytesize=serial.EIGHTBITS,
                parity=serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE,
                timeout=0,
                write_timeout=0,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise ChannelClosed(f"{path}: cannot open: {exc}") from exc
        try:
            fd = port.fileno()
            os.set_blocking(fd, False)
        except (AttributeError, OSError, serial.SerialException) as exc:
            port.close()
            raise ChannelClosed(f"{path}: no file descriptor to watch: {exc}") from exc
        _ask_low_latency(port)
        decoder = FrameDecoder() if frame_timeout is None else FrameDecoder(frame_timeout=frame_timeout)
        channel = cls(port, path=path, baud=baud, pace=pace, pace_reads=pace_reads, decoder=decoder)
        channel.usb_latency_ms = latency_timer_of(fd)
        with contextlib.suppress(OSError):
            channel.latency_timer_file = latency_timer_path(fd)
        return channel

    @property
    def peer(self) -> str:
        return self._path

    @property
    def closed(self) -> bool:
        return self._closed

    def _gone(self, exc: BaseException | str) -> ChannelClosed:
        """The one place where a pyserial/OS failure becomes ChannelClosed; the port is closed with it."""
        self._shutdown()
        return ChannelClosed(f"{self._path}: {exc}")

    # -- receiving ---------------------------------------------------------------------------------------

    async def recv(self) -> Frame | DecodeEvent:
        while not self._pending:
            if self._closed:
                raise ChannelClosed(f"{self._path}: closed")
            timeout: float | None = None
            if self._decoder.buffered:
                # Silence timeout: wake when the partial frame has waited frame_timeout for its next byte.
                timeout = max(0.0, self._last_rx + self._decoder.frame_timeout - time.monotonic()) + 0.001
            if not await self._wait(self._loop.add_reader, self._loop.remove_reader, timeout):
                self._pending.extend(self._decoder.expire(time.monotonic()))
                continue
            data = self._read()
            if not data:
                continue
            if self.pace_reads:
                now = self._loop.time()
                self._rx_free = max(self._rx_free, now) + wire_time(len(data), self.baud)
                await asyncio.sleep(self._rx_free - now)
                self._late(self._rx_free)
            self.bytes_received += len(data)
            self._last_rx = time.monotonic()
            self._pending.extend(self._decoder.feed(data, self._last_rx))
        return self._pending.popleft()

    def _read(self) -> bytes:
        try:
            data: bytes = self._port.read(READ_CHUNK)
        except (serial.SerialException, OSError, TypeError, AttributeError) as exc:
            # pyserial raises SerialException on EIO (pty master gone) and on "ready but no data" (unplug).
            raise self._gone(exc) from exc
        return data

    async def _wait(self, add: Any, remove: Any, timeout: float | None) -> bool:
        """Wait until the fd is readable (add_reader) or writable (add_writer); False on timeout."""
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        try:
            add(self._fd, ready)
        except (OSError, ValueError) as exc:
            raise self._gone(exc) from exc
        self._waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.discard(fut)
            if not self._closed:
                with contextlib.suppress(OSError, ValueError):
                    remove(self._fd)
            if self._closed:
                raise ChannelClosed(f"{self._path}: closed")

    # -- sending -----------------------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            if self._closed:
                raise ChannelClosed(f"{self._path}: closed")
            if not self.pace:
                await self._write_all(memoryview(data))
                return
            # Each slice is written when its last byte would have left a real UART, on an absolute schedule
            # from the moment the line became free, so sleep overshoot never accumulates within a send.
            step = max(1, int(self.baud / BITS_PER_BYTE * PACE_SLICE))
            start = max(self._loop.time(), self._tx_free)
            view = memoryview(data)
            for offset in range(0, len(view), step):
                chunk = view[offset : offset + step]
                due = start + wire_time(offset + len(chunk), self.baud)
                delay = due - self._loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._write_all(chunk)
                self._tx_free = due
            if view:  # nothing was sent, nothing was late
                self._late(self._tx_free)

    def _late(self, due: float) -> None:
        self.pace_late_s += max(0.0, self._loop.time() - due)
        self.pace_events += 1

    async def _write_all(self, view: memoryview) -> None:
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                await self._wait(self._loop.add_writer, self._loop.remove_writer, None)
                continue
            except OSError as exc:
                raise self._gone(exc) from exc
            self.bytes_sent += n
            view = view[n:]

    # -- closing -----------------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for remove in (self._loop.remove_reader, self._loop.remove_writer):
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                remove(self._fd)
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result(None)
        with contextlib.suppress(serial.SerialException, OSError):
            self._port.close()
        self._decoder.reset()

    async def close(self) -> None:
        self._shutdown()


def _ask_low_latency(port: Any) -> None:
    """ASYNC_LOW_LATENCY, which ftdi_sio turns into a 1 ms latency timer (no privilege needed). Best effort: a pty
    or a driver without TIOCSSERIAL refuses it, and the timer read afterwards says what the port does."""
    with contextlib.suppress(AttributeError, ValueError, OSError, serial.SerialException):
        port.set_low_latency_mode(True)


def _require_character_device(path: str) -> None:
    """Refuse a path that is not a character device before opening it: opening (and closing) any other file in
    this process could do harm beyond a failed open. Closing a descriptor of a SQLite database drops every POSIX
    lock this process holds on it, the journal's included, and pyserial closes what it cannot configure."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ChannelClosed(f"{path}: cannot open: {exc.strerror}") from exc
    if not stat.S_ISCHR(st.st_mode):
        raise ChannelClosed(f"{path}: not a serial device (not a character device); refusing to open it")
