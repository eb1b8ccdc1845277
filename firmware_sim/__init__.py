"""Firmware simulator: device SDKs that speak FishChat's device protocols, and the fleet
runner built on them (DESIGN section 7).

``TcpDevice`` / ``V1Device`` (``firmware_sim.tcp_device``) drive the TCP protocol of
``docs/protocol.md``, ``MqttDevice`` (``firmware_sim.mqtt_device``) its MQTT topics and
``SerialDevice`` (``firmware_sim.serial_device``) the serial framing of ``docs/serial.md``,
all on one ``DeviceBase`` (``firmware_sim.device_base``: ids, receipts, dedupe, acks;
``device_e2e`` seals, ``device_types`` holds the errors and messages);
``load_bundle`` reads the provisioning bundle ``fishchat-iot device register`` writes.
"""

import logging

from firmware_sim.bundle import Bundle, BundleError, load_bundle, parse_bundle
from firmware_sim.mqtt_device import MqttDevice
from firmware_sim.serial_device import SerialDevice
from firmware_sim.tcp_device import DeviceError, Message, TcpDevice, V1Device

# A library logs; the application decides where to (no "lastResort" lines on stderr).
logging.getLogger("firmware_sim").addHandler(logging.NullHandler())

__all__ = [
    "Bundle",
    "BundleError",
    "DeviceError",
    "Message",
    "MqttDevice",
    "SerialDevice",
    "TcpDevice",
    "V1Device",
    "load_bundle",
    "parse_bundle",
]
