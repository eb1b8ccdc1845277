"""The bus: node registry, presence and node inboxes (in-process embedded, Redis distributed)."""
