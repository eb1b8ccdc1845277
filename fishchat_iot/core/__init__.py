"""The transport-independent core: messages, sessions, delivery, topics."""
