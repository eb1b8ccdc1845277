"""Entry point of ``fishchat-iot``: builds the argparse tree from the command modules and
turns every failure into one ``error: ...`` line on stderr and a non-zero exit.

Plug-in shape: each module in ``COMMAND_MODULES`` (``fishchat_iot.cli.<name>``) has
``register(sub: argparse._SubParsersAction) -> None``, which adds its parser(s) and sets
``func=<callable(args) -> int>`` with ``set_defaults``. A module that does not exist is
a command that is absent; one that fails to import leaves a command that reports the
failure, so a broken ``up`` never keeps an operator from revoking a device. Keep heavy
imports (the broker, drivers) inside ``func``: every invocation imports every module.

The global options ``--data-dir``, ``--config`` and ``--json`` are accepted before the
command and after it; command modules must not define them again and read them as
``args.data_dir``, ``args.config`` and ``args.json`` (``context.settings_from_args``).
Raise ``output.CliError`` for expected failures; anything else is reported as a bug.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import sys
import traceback
from collections.abc import Callable
from types import ModuleType

from fishchat_iot import __version__
from fishchat_iot.cli.output import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    CliError,
    one_line,
    print_error,
)

COMMAND_MODULES = (
    "device",
    "topic",
    "status",
    "up",
    "run",
    "sim",
    "send",
    "mqtt",
    "certs",
    "operator",
    "bench",
)

DEBUG_ENV = "FISHCHAT_DEBUG"

GLOBAL_DESTS = ("data_dir", "config", "json")


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _add_global_options(parser: argparse.ArgumentParser, after_command: bool) -> None:
    """The global options. After the command their default is SUPPRESS, so leaving them
    out there keeps what was given before the command."""
    skip = {s for a in parser._actions for s in a.option_strings}
    default: dict[str, object] = {"default": argparse.SUPPRESS} if after_command else {}
    group = parser.add_argument_group("global options") if after_command else parser
    if "--data-dir" not in skip:
        group.add_argument(
            "--data-dir",
            metavar="DIR",
            help="where the embedded store, bundles and status file live (default: "
            "$FISHCHAT_DATA_DIR, else node.data_dir from --config, else ./data)",
            **default,  # type: ignore[arg-type]
        )
    if "--config" not in skip:
        group.add_argument(
            "--config",
            metavar="FILE",
            help="settings file, TOML or JSON (see docs/configuration.md)",
            **default,  # type: ignore[arg-type]
        )
    if "--json" not in skip:
        group.add_argument(
            "--json",
            action="store_true",
            help="print one JSON document (for scripts) instead of text for people",
            **default,  # type: ignore[arg-type]
        )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _accept_global_options_after(parser: argparse.ArgumentParser) -> None:
    """Add the global options to every command parser, at every depth."""
    seen: set[int] = set()
    pending = [p for s in _subparsers(parser) for p in s.choices.values()]
    while pending:
        sub = pending.pop()
        if id(sub) in seen:  # aliases share one parser
            continue
        seen.add(id(sub))
        for action in sub._actions:
            # A command that defines a global option itself must not reset its value
            # when the option is given before the command only.
            if action.dest in GLOBAL_DESTS and action.option_strings:
                action.default = argparse.SUPPRESS
        _add_global_options(sub, after_command=True)
        pending.extend(p for s in _subparsers(sub) for p in s.choices.values())


def _broken_command(name: str, exc: BaseException) -> Callable[[argparse.Namespace], int]:
    reason = one_line(f"{type(exc).__name__}: {exc}")

    def run(args: argparse.Namespace) -> int:
        raise CliError(
            f"the '{name}' command is unavailable: importing fishchat_iot.cli.{name} failed "
            f"({reason}): check the installation ('pip install -e .'), or re-run with "
            f"{DEBUG_ENV}=1 to see the traceback"
        )

    return run


def _load_command_modules(
    sub: argparse._SubParsersAction,
) -> list[ModuleType]:
    modules = []
    for name in COMMAND_MODULES:
        full = f"fishchat_iot.cli.{name}"
        try:
            module = importlib.import_module(full)
            module.register(sub)
        except ModuleNotFoundError as exc:
            if exc.name == full:
                continue  # not written yet / not installed: the command is simply absent
            broken: BaseException = exc
        except Exception as exc:
            broken = exc
        else:
            modules.append(module)
            continue
        if _debug():
            traceback.print_exception(broken)
        if name in sub.choices:  # register() failed half-way: what it added reports it
            sub.choices[name].set_defaults(func=_broken_command(name, broken))
            continue
        parser = sub.add_parser(name, help=f"(unavailable: {type(broken).__name__})")
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        parser.set_defaults(func=_broken_command(name, broken))
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fishchat-iot",
        description="FishChat IoT: a messaging gateway for smart hardware. "
        "Operator commands for the registry, the server and its status.",
        epilog="Every command takes --json; errors are one 'error: ...' line on stderr. "
        f"Set {DEBUG_ENV}=1 to see tracebacks. Reference: docs/cli.md.",
    )
    _add_global_options(parser, after_command=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _load_command_modules(sub)
    _accept_global_options_after(parser)
    return parser


def _setup_streams() -> None:
    # A topic name in a script the terminal cannot show must not end in a UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def _silence_stdout() -> None:
    """After EPIPE (``fishchat-iot device list | head -1``): stop Python from failing
    again when it flushes stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (see docs/cli.md)."""
    _setup_streams()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int | None] = args.func
        code = func(args)
        sys.stdout.flush()
        return int(code or 0)
    except CliError as exc:
        if _debug():
            traceback.print_exc()
        print_error(exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        print_error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_ERROR
    except Exception as exc:
        if _debug():
            traceback.print_exc()
        detail = one_line(str(exc)) or "no details"
        print_error(
            f"unexpected {type(exc).__name__}: {detail} (this is a bug; re-run with "
            f"{DEBUG_ENV}=1 to see the traceback, and report it)"
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
