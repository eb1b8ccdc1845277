"""The MQTT adapter: devices on MQTT 3.1.1 under ``fc/{id}/`` (docs/protocol.md), either
on the embedded amqtt broker (``broker.py``) or on an external broker the gateway
attaches to as a client (``external.py``)."""
