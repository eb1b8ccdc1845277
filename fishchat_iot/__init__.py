"""FishChat IoT: a messaging gateway for smart hardware (roles, core, stores, CLI)."""

__version__ = "0.1.0"
