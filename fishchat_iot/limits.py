"""Abuse limits (``[limits]``, docs/security.md): token buckets for each device's
message and byte rates, failed-login throttling per source address and per device id,
and connection-rate limits per source address.

Cheap on the hot path: a device's buckets are refilled once per read batch (one
``time.monotonic()`` the adapter already takes) and a message costs a float compare and
a subtraction. The per-address and per-device tables are bounded: past ``MAX_KEYS``
entries the ones whose bucket is full again (forgotten offenders) are dropped.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from fishchat_iot.config import LimitsSettings

log = logging.getLogger("fishchat.limits")

MAX_KEYS = 100_000
LOG_EVERY = 10.0  # seconds: a throttled source is logged at most this often


class Bucket:
    """A token bucket: ``rate`` tokens a second up to ``burst``; may go negative (debt)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.stamp = now
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst

    def wait(self) -> float:
        """Seconds until the bucket is out of debt (0 if it is not in debt)."""
        return -self.tokens / self.rate if self.tokens < 0 and self.rate > 0 else 0.0


class _RateConf:
    """The per-device rates and bursts of one ``Limits``, shared by every ``DeviceRate``."""

    __slots__ = ("byte_burst", "byte_rate", "msg_burst", "msg_rate")

    def __init__(self, cfg: LimitsSettings) -> None:
        self.msg_rate = cfg.msg_rate if cfg.msg_rate > 0 else 0.0  # 0.0: no message limit
        self.msg_burst = max(1.0, float(cfg.msg_burst))
        self.byte_rate = cfg.byte_rate if cfg.byte_rate > 0 else 0.0  # 0.0: no byte limit
        self.byte_burst = max(1.0, float(cfg.byte_burst))


class DeviceRate:
    """One device's message and byte buckets (kept across its reconnects).

    Both token buckets in one small object: they are always refilled together (one
    stamp), and their rates and bursts are the shared ``_RateConf`` — a device costs
    this object and three floats, not three objects and their floats.
    """

    __slots__ = ("byte_tokens", "conf", "msg_tokens", "stamp")

    def __init__(self, cfg: LimitsSettings | _RateConf, now: float) -> None:
        conf = cfg if isinstance(cfg, _RateConf) else _RateConf(cfg)
        self.conf = conf
        self.msg_tokens = conf.msg_burst
        self.byte_tokens = conf.byte_burst
        self.stamp = now

    def refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.stamp = now
            conf = self.conf
            if conf.msg_rate:
                self.msg_tokens = min(conf.msg_burst, self.msg_tokens + elapsed * conf.msg_rate)
            if conf.byte_rate:
                self.byte_tokens = min(conf.byte_burst, self.byte_tokens + elapsed * conf.byte_rate)

    def take_msg(self, force: bool = False) -> bool:
        """One message: True if within the rate; ``force`` takes it anyway (into debt)."""
        if not self.conf.msg_rate:
            return True
        if self.msg_tokens >= 1.0:
            self.msg_tokens -= 1.0
            return True
        if force:
            self.msg_tokens -= 1.0
        return False

    def take_bytes(self, n: int, force: bool = True) -> bool:
        if not self.conf.byte_rate:
            return True
        if self.byte_tokens >= n or force:
            self.byte_tokens -= n
            return self.byte_tokens >= 0
        return False

    def wait(self) -> float:
        """Seconds a paused (v1) reader should wait for both buckets to be out of debt."""
        conf = self.conf
        w = 0.0
        if conf.msg_rate and self.msg_tokens < 0:
            w = -self.msg_tokens / conf.msg_rate
        if conf.byte_rate and self.byte_tokens < 0:
            w = max(w, -self.byte_tokens / conf.byte_rate)
        return w


class _Table:
    """Buckets by key (an address or a device id), bounded."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: dict[str, Bucket] = {}

    def get(self, key: str, now: float) -> Bucket:
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= MAX_KEYS:
                self._prune(now)
            b = self.buckets[key] = Bucket(self.rate, self.burst, now)
        else:
            b.refill(now)
        return b

    def peek(self, key: str, now: float) -> Bucket | None:
        b = self.buckets.get(key)
        if b is not None:
            b.refill(now)
        return b

    def _prune(self, now: float) -> None:
        for key in [k for k, b in self.buckets.items() if b.full(now)]:
            del self.buckets[key]
        if len(self.buckets) >= MAX_KEYS:  # still full of offenders: forget the oldest
            for key in list(self.buckets)[: MAX_KEYS // 10]:
                del self.buckets[key]


class Limits:
    """The limits of one server process, shared by its transports."""

    def __init__(self, cfg: LimitsSettings) -> None:
        self.cfg = cfg
        self.exempt = frozenset(cfg.exempt.replace(",", " ").split())
        refill = cfg.login_fail_refill
        self.fail_addr = _Table(refill, float(cfg.login_fail_burst))
        self.fail_device = _Table(refill, float(cfg.login_fail_device_burst))
        self.conns = _Table(cfg.conn_rate, float(cfg.conn_burst))
        self.devices: dict[str, DeviceRate] = {}
        self._rate_conf = _RateConf(cfg)
        self._logged: dict[str, tuple[float, int]] = {}  # key -> (last logged, refused since)

    # -- per device ---------------------------------------------------------------------
    @property
    def rates_enabled(self) -> bool:
        return self.cfg.msg_rate > 0 or self.cfg.byte_rate > 0

    def device_rate(self, device_id: str, addr: str) -> DeviceRate | None:
        """The device's buckets, or None: no rate limits, or a session from an exempt
        address (limits.exempt: loopback by default, for development and benchmarks)."""
        if not self.rates_enabled or addr in self.exempt:
            return None
        r = self.devices.get(device_id)
        if r is None:
            if len(self.devices) >= MAX_KEYS:
                self.devices.clear()  # all full again within burst/rate seconds anyway
            r = self.devices[device_id] = DeviceRate(self._rate_conf, time.monotonic())
        return r

    # -- connections ----------------------------------------------------------------------
    def connection_allowed(self, addr: str, what: str) -> bool:
        """A new connection from ``addr``; False (and logged, not too often) if over the
        connection rate."""
        if self.cfg.conn_rate <= 0 or addr in self.exempt:
            return True
        b = self.conns.get(addr, time.monotonic())
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return True
        self._log_refused(
            f"conn:{addr}",
            "connections from %s over limits.conn_rate (%g/s, burst %d): closing them "
            "(%d refused since the last line) [%s]",
            addr,
            self.cfg.conn_rate,
            self.cfg.conn_burst,
            what,
        )
        return False

    # -- logins ---------------------------------------------------------------------------
    def login_blocked(self, addr: str, device_id: str) -> str | None:
        """Why a login from ``addr`` as ``device_id`` is throttled now, or None."""
        now = time.monotonic()
        if addr not in self.exempt and self.cfg.login_fail_burst > 0:
            b = self.fail_addr.peek(addr, now)
            if b is not None and b.tokens < 1.0:
                wait = (1.0 - b.tokens) / b.rate if b.rate > 0 else 60.0
                self._log_refused(
                    f"addr:{addr}",
                    "logins from %s throttled: too many failed logins "
                    "(limits.login_fail_burst %d) (%d refused since the last line) [%s]",
                    addr,
                    self.cfg.login_fail_burst,
                    device_id,
                )
                return f"too many failed logins from {addr}: retry in {wait:.0f} s"
        if self.cfg.login_fail_device_burst > 0:
            b = self.fail_device.peek(device_id, now)
            if b is not None and b.tokens < 1.0:
                wait = (1.0 - b.tokens) / b.rate if b.rate > 0 else 60.0
                self._log_refused(
                    f"dev:{device_id}",
                    "logins as %s throttled: too many failed logins "
                    "(limits.login_fail_device_burst %d) (%d refused since the last line) [%s]",
                    device_id,
                    self.cfg.login_fail_device_burst,
                    addr,
                )
                return f"too many failed logins as {device_id!r}: retry in {wait:.0f} s"
        return None

    def login_failed(self, addr: str, device_id: str) -> None:
        now = time.monotonic()
        if addr not in self.exempt and self.cfg.login_fail_burst > 0:
            self.fail_addr.get(addr, now).tokens -= 1.0
        if self.cfg.login_fail_device_burst > 0:
            self.fail_device.get(device_id, now).tokens -= 1.0

    def _log_refused(self, key: str, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        last, count = self._logged.get(key, (0.0, 0))
        if now - last >= LOG_EVERY:
            if len(self._logged) >= MAX_KEYS:
                self._logged.clear()
            self._logged[key] = (now, 0)
            subject, rest = args[0], args[1:-1]
            log.warning(fmt, subject, *rest, count + 1, args[-1])
        else:
            self._logged[key] = (last, count + 1)


_BY_SERVER: weakref.WeakKeyDictionary[Any, Limits] = weakref.WeakKeyDictionary()


def limits_for(server: Any) -> Limits:
    """The ``Limits`` of a msg_server (one per server, from its settings)."""
    lim = _BY_SERVER.get(server)
    if lim is None:
        lim = _BY_SERVER[server] = Limits(server.settings.limits)
    return lim


def host_of(peer: str) -> str:
    """``1.2.3.4:5678`` or ``::1:5678`` -> the address part."""
    return peer.rpartition(":")[0] or peer
