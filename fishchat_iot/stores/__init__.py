"""Durable state behind one interface (``Store``): SQLite embedded, MongoDB distributed."""
