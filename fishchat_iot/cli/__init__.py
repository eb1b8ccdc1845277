"""The operator command line, ``fishchat-iot`` (DESIGN section 6).

``main.py`` builds the argparse tree and turns every expected failure into one
``error: ...`` line. Each command module (``device``, ``topic``, ``status``, ``up``,
``run``, ``sim``, ``send``) exposes ``register(sub)``, which adds its parser(s) and sets
``func=<callable(args) -> int>``; ``context.py`` turns the global options into
``Settings`` and an open store; ``output.py`` prints tables for people, JSON for scripts
and raises ``CliError`` for the one-line errors. ``docs/cli.md`` is the reference.
"""
