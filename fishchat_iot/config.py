"""Settings for every role: defaults, then the ``--config`` file (TOML or JSON), then
``FISHCHAT_*`` environment variables, then command-line options (DESIGN section 6).

Every option is documented with its default and unit in ``docs/configuration.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration problem, phrased for the operator (one line)."""


@dataclass
class NodeSettings:
    id: str = ""  # node id; "" = derived from the host and msg port
    data_dir: str = "./data"  # where the embedded store and status file live
    advertise_host: str = "127.0.0.1"  # host devices are told to connect to
    log_level: str = "info"  # debug, info, warning or error


@dataclass
class TcpSettings:
    host: str = "127.0.0.1"  # bind address of the TCP listeners
    gateway_port: int = 17000  # REQ_MSG_SERVER listener; 0 = pick a free port
    msg_port: int = 19000  # msg_server listener; 0 = pick a free port
    max_frame: int = 65536  # bytes; a larger frame is refused and the connection closed
    allow_v1: bool = True  # accept token-less v1 logins (for devices registered --v1)
    keepalive: float = 60.0  # seconds of silence after which a session is closed
    login_timeout: float = 10.0  # seconds a connection may stay without logging in


@dataclass
class DeliverySettings:
    offline_max: int = 10000  # messages per device queue; beyond it senders get QUEUE_FULL
    offline_max_age: float = 7 * 86400.0  # seconds a queued message is kept
    inflight_window: int = 1000  # unacked messages per session before it is fed from the store
    max_pending_receipts: int = 2000  # per session; reading pauses above it
    receipt: str = "written"  # ACCEPTED once "written" to a live session, or once "acked" by it
    ack_wait: float = 2.0  # "acked": seconds a live delivery waits for its ack before it is stored
    hold_wait: float = 0.5  # seconds a message waits in memory for a recipient a window behind


@dataclass
class StoreSettings:
    backend: str = "sqlite"  # "sqlite" (embedded) or "mongodb" (distributed)
    path: str = ""  # SQLite file; "" = {data_dir}/fishchat.db
    queue_max: int = 100000  # operations waiting for the store thread; beyond it UNAVAILABLE
    mongo_url: str = "mongodb://127.0.0.1:27017"  # backend "mongodb": the server or replica set
    mongo_database: str = "fishchat"  # backend "mongodb": the database
    timeout: float = 10.0  # backend "mongodb": seconds an operation may take
    server_key: str = ""  # key sealing bodies at rest; "" = {data_dir}/server.key


@dataclass
class BusSettings:
    backend: str = "local"  # "local" (every role in one process) or "redis" (distributed)
    url: str = "redis://127.0.0.1:6379/0"  # backend "redis"
    prefix: str = "fc"  # backend "redis": key prefix
    node_ttl: float = 10.0  # seconds a node counts as alive after its last heartbeat
    presence_ttl: float = 30.0  # seconds a dead node's devices still look present
    claim_idle: float = 30.0  # seconds an unacked inbox entry waits before it is taken over
    timeout: float = 5.0  # seconds a Redis call may take


@dataclass
class SerialPortSettings:
    """One ``[[serial.ports]]`` entry: a port and the one device on it (docs/serial.md)."""

    url: str = ""  # pyserial URL: /dev/ttyUSB0, rfc2217://h:p, socket://h:p, loop://
    name: str = ""  # label in logs and counters; "" = the url
    baudrate: int = 0  # 0 = serial.baudrate
    crc: str = ""  # "crc16" or "crc32"; "" = serial.crc
    msg_server: str = ""  # upstream host:port; "" = serial.msg_server
    gateway: str = ""  # ask this gateway for a msg_server; "" = serial.gateway


def _parse_serial_ports(value: Any, where: str) -> list[SerialPortSettings]:
    """``[[serial.ports]]`` tables (or, from the environment, a JSON list of objects)."""
    if isinstance(value, str):
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
    if not isinstance(value, list):
        raise ConfigError(
            f"{where}: expected a list of port tables ([[serial.ports]] in TOML, a JSON "
            "list of objects in JSON or in the environment)"
        )
    ports = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{at}: expected a table with at least a url")
        port = SerialPortSettings()
        known = {f.name: f for f in dataclasses.fields(port)}
        for key, raw in item.items():
            f = known.get(key)
            if f is None:
                raise ConfigError(f"{at}: unknown option {key} (known: {', '.join(known)})")
            ftype = f.type if isinstance(f.type, str) else f.type.__name__
            setattr(port, key, _coerce(raw, _TYPES[ftype], f"{at}.{key}"))
        if not port.url.strip():
            raise ConfigError(f"{at}: no url: give the port's device path or pyserial URL")
        ports.append(port)
    return ports


@dataclass
class SerialSettings:
    # The ports of `run serial-adapter` (or of `up`); see SerialPortSettings.
    ports: list[SerialPortSettings] = field(
        default_factory=list, metadata={"parse": _parse_serial_ports}
    )
    baudrate: int = 115200  # bits per second, for ports that do not say
    crc: str = "crc16"  # "crc16" (CRC-16/CCITT-FALSE) or "crc32", for ports that do not say
    max_frame: int = 65536  # bytes of body; a longer frame is dropped and NACKed
    msg_server: str = ""  # upstream host:port; "" = the local one in `up`
    gateway: str = ""  # ask this gateway (host:port) for a msg_server instead
    reopen_min: float = 0.5  # seconds before reopening a port that vanished
    reopen_max: float = 30.0  # seconds: the backoff doubles up to this
    connect_timeout: float = 10.0  # seconds to reach the upstream msg_server


@dataclass
class MqttSettings:
    mode: str = "embedded"  # "embedded" (amqtt in this process), "external" or "off"
    host: str = "127.0.0.1"  # bind address of the embedded broker
    port: int = 1883  # embedded broker's listener; 0 = pick a free port
    keepalive_factor: float = 1.5  # close a session silent for this x its MQTT keepalive
    max_qos: int = 1  # highest QoS the gateway publishes on fc/{id}/in (0 or 1)
    max_payload: int = 65536  # bytes of one envelope; a larger one is refused on the inbox
    max_packet: int = 1048576  # bytes of one MQTT packet; a larger one closes the connection
    connect_timeout: float = 10.0  # seconds a connection may stay without a CONNECT
    broker_host: str = "127.0.0.1"  # external mode: the broker the gateway attaches to
    broker_port: int = 1883  # external mode
    username: str = "fishchat-gateway"  # external mode: the gateway's own broker account
    password: str = ""  # external mode: its password
    client_id: str = ""  # external mode: "" = fishchat-gateway-<random>
    share_group: str = "fishchat"  # external mode: uplinks via $share/<group>/...
    broker_keepalive: int = 30  # external mode: seconds, the gateway's own MQTT keepalive
    uplink_max: int = 10000  # external mode: broker messages waiting for the event loop


@dataclass
class LimitsSettings:
    msg_rate: float = 100.0  # messages/s per device, sustained; 0 = no limit
    msg_burst: int = 200  # messages a device may send at once above msg_rate
    byte_rate: float = 1048576.0  # bytes/s per device read from it, sustained; 0 = no limit
    byte_burst: int = 4194304  # bytes at once above byte_rate
    login_fail_burst: int = 10  # failed logins per source address before it is throttled
    login_fail_device_burst: int = 50  # failed logins per device id before it is throttled
    login_fail_refill: float = 0.1  # failed logins forgiven per second (one every 10 s)
    conn_rate: float = 50.0  # new connections/s per source address; 0 = no limit
    conn_burst: int = 200  # connections at once above conn_rate
    exempt: str = "127.0.0.1 ::1"  # addresses without per-address limits (space-separated)


@dataclass
class TlsSettings:
    enabled: bool = False  # also listen with TLS (needs `certs init` + `certs issue server`)
    msg_port: int = 19443  # TLS msg_server listener; 0 = pick a free port
    mqtt_port: int = 8883  # TLS listener of the embedded MQTT broker; 0 = pick a free port
    cert: str = ""  # server certificate (PEM); "" = {data_dir}/certs/server.pem
    key: str = ""  # its private key (PEM); "" = {data_dir}/certs/server.key
    ca: str = ""  # CA that client certificates must chain to; "" = {data_dir}/certs/ca.pem


@dataclass
class MonitorSettings:
    enabled: bool = True  # serve the dashboard, JSON API and /metrics (docs/monitor.md)
    host: str = "127.0.0.1"  # bind address of the monitor
    port: int = 30000  # dashboard + API (+ /metrics, /healthz, /readyz); 0 = pick a free port
    metrics_host: str = ""  # a separate bind for /metrics and health, served without a token
    metrics_port: int = -1  # -1 = no separate bind (then /metrics needs a token); 0 = free port
    session_hours: float = 12.0  # hours a login cookie stays valid


@dataclass
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    tcp: TcpSettings = field(default_factory=TcpSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    bus: BusSettings = field(default_factory=BusSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    serial: SerialSettings = field(default_factory=SerialSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)

    @property
    def data_dir(self) -> Path:
        return Path(self.node.data_dir)

    @property
    def sqlite_path(self) -> Path:
        return Path(self.store.path) if self.store.path else self.data_dir / "fishchat.db"

    @property
    def server_key_path(self) -> Path:
        key = self.store.server_key
        return Path(key) if key else self.data_dir / "server.key"

    def check(self) -> None:
        """Raise ConfigError for values no role can start with."""
        choices = {
            "store.backend": (self.store.backend, ("sqlite", "mongodb")),
            "bus.backend": (self.bus.backend, ("local", "redis")),
            "delivery.receipt": (self.delivery.receipt, ("written", "acked")),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(
                    f"{name}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}"
                )


def _coerce(value: Any, target: type, where: str) -> Any:
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if target is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}") from None
    if target is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _apply(settings: Settings, section: str, key: str, value: Any, where: str) -> None:
    sect = getattr(settings, section, None)
    if sect is None or not dataclasses.is_dataclass(sect):
        known = ", ".join(f.name for f in dataclasses.fields(settings))
        raise ConfigError(f"{where}: unknown section [{section}] (known: {known})")
    fields = {f.name: f for f in dataclasses.fields(sect)}
    if key not in fields:
        raise ConfigError(f"{where}: unknown option {section}.{key} (known: {', '.join(fields)})")
    parse = fields[key].metadata.get("parse")
    if parse is not None:  # an option that is not a scalar (serial.ports)
        setattr(sect, key, parse(value, where))
        return
    ftype = fields[key].type
    target = _TYPES[ftype if isinstance(ftype, str) else ftype.__name__]
    setattr(sect, key, _coerce(value, target, where))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML or JSON config file; errors name the file and what to fix."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist: check the --config path") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p}: invalid TOML: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config file {p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a table of sections at the top")
    return data


def load_settings(
    config_file: str | Path | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Defaults < config file < FISHCHAT_SECTION_KEY environment < overrides
    ("section.key" -> value, None values are ignored)."""
    settings = Settings()
    if config_file is not None:
        data = read_config_file(config_file)
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{config_file}: [{section}] must be a table of options")
            for key, value in values.items():
                _apply(settings, section, key, value, f"{config_file}: {section}.{key}")
    environ = os.environ if env is None else env
    if "FISHCHAT_DATA_DIR" in environ:
        settings.node.data_dir = environ["FISHCHAT_DATA_DIR"]
    for f in dataclasses.fields(settings):
        for sf in dataclasses.fields(getattr(settings, f.name)):
            var = f"FISHCHAT_{f.name}_{sf.name}".upper()
            if var in environ:
                _apply(settings, f.name, sf.name, environ[var], f"environment {var}")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        _apply(settings, section, key, value, f"option {dotted}")
    return settings
