"""Device adapters: each turns one transport (TCP, MQTT, serial) into core sessions."""
