"""A pyserial port driven from asyncio without blocking the event loop.

Why threads (and not ``loop.add_reader`` on the file descriptor): ports are named by
pyserial URLs, and only the plain device path has a descriptor that means "bytes from
the line" — ``rfc2217://`` runs its own telnet negotiation thread, ``socket://`` and
``loop://`` have their own read functions. A reader and a writer thread per port use
pyserial's own blocking calls for every URL alike; a host has a handful of ports, so two
mostly idle threads each cost nothing that matters.

- The **reader thread** reads whatever is available and appends it to a bounded buffer;
  one ``call_soon_threadsafe`` wakes the loop per batch (not per read), and the loop
  takes the whole buffer. When the buffer holds ``read_buffer_max`` bytes the thread
  waits (so does the line: the kernel's buffer fills, then flow control, if any, stops
  the sender). ``pause_reading`` stops it the same way, for backpressure from upstream.
- The **writer thread** writes what ``write`` appended, in order. ``write`` never
  blocks; ``write_buffer_size`` says how much waits, and ``on_drained`` is called when
  it falls below ``low_water`` after having been above ``high_water``.
- Either thread failing (a USB adapter unplugged, a pty whose other side closed, a
  socket reset) calls ``on_lost(exc)`` once, on the loop. ``close`` stops both threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import serial

READ_TIMEOUT = 0.25  # seconds a read waits; bounds how long close() takes without cancel_read
READ_MAX = 65536
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024

OPEN_ERRORS = (serial.SerialException, OSError, ValueError)


def open_serial(url: str, baudrate: int) -> Any:
    """Open a pyserial URL (a device path, ``rfc2217://``, ``socket://``, ``loop://``...)
    for the reader and writer threads; raises SerialException/OSError/ValueError."""
    return serial.serial_for_url(url, baudrate=baudrate, timeout=READ_TIMEOUT, write_timeout=None)


def _close_opened(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        with contextlib.suppress(Exception):
            fut.result().close()


class SerialPort:
    """One open port. Create, ``await open()``, then ``write``; ``await close()``.

    Not reusable: after ``on_lost`` or ``close`` make a new one (the adapter does, with
    backoff). The callbacks run on the event loop that called ``open``."""

    def __init__(
        self,
        url: str,
        baudrate: int,
        on_data: Callable[[bytes], None],
        on_lost: Callable[[BaseException], None],
        on_drained: Callable[[], None] | None = None,
        *,
        read_buffer_max: int = 256 * 1024,
        high_water: int = HIGH_WATER,
        low_water: int = LOW_WATER,
        name: str = "",
    ) -> None:
        self.url = url
        self.baudrate = baudrate
        self.name = name or url
        self._on_data = on_data
        self._on_lost = on_lost
        self._on_drained = on_drained
        self._read_max = max(1, read_buffer_max)
        self.high_water = high_water
        self.low_water = low_water
        self._ser: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._read_cond = threading.Condition(self._lock)
        self._write_cond = threading.Condition(self._lock)
        self._inbuf = bytearray()
        self._wake_scheduled = False
        self._paused = False
        self._outbuf = bytearray()
        self._writing = 0  # bytes handed to ser.write() and not yet written
        self._above_high = False
        self._stop = False
        self._failed = False
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._flushed: asyncio.Event | None = None  # set while close() waits for the line
        self.bytes_in = 0
        self.bytes_out = 0

    # -- lifecycle -----------------------------------------------------------------
    async def open(self) -> None:
        """Open the port (in a thread: opening ``rfc2217://`` or ``socket://`` talks
        to the network) and start the reader and writer threads."""
        self._loop = asyncio.get_running_loop()
        opening = asyncio.ensure_future(asyncio.to_thread(open_serial, self.url, self.baudrate))
        try:
            self._ser = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The thread goes on opening: close what it opens, nobody will use it.
            opening.add_done_callback(_close_opened)
            raise
        for target, role in ((self._reader, "read"), (self._writer, "write")):
            t = threading.Thread(target=target, name=f"serial-{role}-{self.name}", daemon=True)
            self._threads.append(t)
            t.start()

    @property
    def is_open(self) -> bool:
        return self._ser is not None and not self._stop

    async def close(self, flush_timeout: float = 0.0) -> None:
        """Stop the threads and close the port; with ``flush_timeout``, first wait up
        to that long for what was written to reach the line. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if flush_timeout > 0 and not self._failed:
            self._flushed = asyncio.Event()
            if self.write_buffer_size:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(flush_timeout):
                        await self._flushed.wait()
        with self._lock:
            self._stop = True
            self._read_cond.notify_all()
            self._write_cond.notify_all()
        ser = self._ser
        if ser is not None:
            for cancel in ("cancel_read", "cancel_write"):
                fn = getattr(ser, cancel, None)
                if fn is not None:
                    with contextlib.suppress(Exception):
                        fn()
        threads, self._threads = self._threads, []
        for t in threads:
            await asyncio.to_thread(t.join, 2.0)
        if ser is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(ser.close)

    # -- reading -------------------------------------------------------------------
    def pause_reading(self) -> None:
        with self._lock:
            self._paused = True

    def resume_reading(self) -> None:
        with self._lock:
            self._paused = False
            self._read_cond.notify_all()

    def _reader(self) -> None:
        ser = self._ser
        cond = self._read_cond
        try:
            while True:
                with cond:
                    while not self._stop and (self._paused or len(self._inbuf) >= self._read_max):
                        cond.wait(0.5)
                    if self._stop:
                        return
                data = ser.read(max(1, min(ser.in_waiting, READ_MAX)))
                if not data:
                    continue
                with cond:
                    if self._stop:
                        return
                    self._inbuf += data
                    if self._wake_scheduled:
                        continue
                    self._wake_scheduled = True
                self._call(self._take_input)
        except BaseException as exc:
            self._fail(exc)

    def _take_input(self) -> None:
        with self._read_cond:
            data = bytes(self._inbuf)
            self._inbuf.clear()
            self._wake_scheduled = False
            self._read_cond.notify_all()
        if data and not self._closed:
            self.bytes_in += len(data)
            self._on_data(data)

    # -- writing -------------------------------------------------------------------
    @property
    def write_buffer_size(self) -> int:
        """Bytes written with ``write`` that have not reached the line yet."""
        return len(self._outbuf) + self._writing

    def write(self, data: bytes | bytearray) -> None:
        """Queue ``data`` for the line; never blocks. Dropped once the port failed."""
        if not data or self._stop or self._failed:
            return
        with self._write_cond:
            self._outbuf += data
            self._write_cond.notify()
            if not self._above_high and len(self._outbuf) + self._writing > self.high_water:
                self._above_high = True

    @property
    def backed_up(self) -> bool:
        """More than ``high_water`` bytes wait (until they fall below ``low_water``)."""
        return self._above_high

    def _writer(self) -> None:
        ser = self._ser
        cond = self._write_cond
        try:
            while True:
                with cond:
                    while not self._outbuf and not self._stop:
                        cond.wait()
                    if self._stop:
                        return
                    data = bytes(self._outbuf)
                    self._outbuf.clear()
                    self._writing = len(data)
                ser.write(data)
                with cond:
                    self._writing = 0
                    self.bytes_out += len(data)
                    drained = self._above_high and len(self._outbuf) < self.low_water
                    if drained:
                        self._above_high = False
                if drained and self._on_drained is not None:
                    self._call(self._on_drained)
                if self._flushed is not None and not self.write_buffer_size:
                    self._call(self._flushed.set)
        except BaseException as exc:
            self._fail(exc)

    # -- plumbing ------------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            loop.call_soon_threadsafe(fn, *args)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._stop or self._failed:
                return  # closing: errors from cancelled reads are expected
            self._failed = True
            self._stop = True
            self._read_cond.notify_all()
            self._write_cond.notify_all()
        self._call(self._report_lost, exc)

    def _report_lost(self, exc: BaseException) -> None:
        if not self._closed:
            self._on_lost(exc)
