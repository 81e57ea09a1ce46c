"""The frame of ``autoglm models``: shared options, adding a subcommand, and exit statuses.

A subcommand is an *action*, a function of the parsed arguments that prints its result and
raises :class:`RegistryError` to refuse, or returns its own exit status. :func:`add_command`
adds one to the subparsers that :func:`auto_glm.registry.cli.configure` returns; :func:`run`
runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from auto_glm.registry.errors import IntegrityError, RegistryError, SignatureError
from auto_glm.registry.hashing import Progress
from auto_glm.registry.store import ModelRegistry

__all__ = ["Action", "add_command", "add_global_options", "open_registry", "progress", "run"]

Action = Callable[[argparse.Namespace], int | None]


def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``--database`` and ``--registry``; ``suppress``: only set when given (for subcommands,
    so that the value given before the subcommand's name is kept)."""

    def default(variable: str) -> str | None:
        return argparse.SUPPRESS if suppress else os.environ.get(variable) or None

    parser.add_argument(
        "--database",
        metavar="URL",
        default=default("AUTOGLM_DATABASE_URL"),
        help="sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB (default: "
        "$AUTOGLM_DATABASE_URL, else sqlite:///$AUTOGLM_HOME/autoglm.db)",
    )
    parser.add_argument(
        "--registry",
        metavar="DIR",
        default=default("AUTOGLM_REGISTRY_DIR"),
        help="where --copy puts model files (default: $AUTOGLM_REGISTRY_DIR, else "
        "$AUTOGLM_HOME/models, AUTOGLM_HOME defaulting to ~/.cache/autoglm)",
    )


def add_command(
    commands: argparse._SubParsersAction,
    name: str,
    help: str,
    action: Action,
    *,
    registry_options: bool = True,
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` running ``action``; returns its parser for its arguments.

    ``registry_options``: accept ``--database`` and ``--registry`` after the name too (an
    action that does not open the registry can leave them out).
    """
    parser = commands.add_parser(name, help=help, description=help)
    parser.set_defaults(action=action)
    if registry_options:
        add_global_options(parser, suppress=True)
    return parser


def open_registry(args: argparse.Namespace) -> ModelRegistry:
    """The registry that ``--database`` and ``--registry`` name."""
    return ModelRegistry(args.database, args.registry)


def progress(label: str) -> Progress | None:
    """A progress line on stderr while hashing, if stderr is a terminal."""
    if not sys.stderr.isatty():
        return None
    shown = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - shown[0] < 0.2:
            return
        shown[0] = now
        end = "\n" if done >= total else ""
        print(f"\r{label}: {done / 2**30:.2f} of {total / 2**30:.2f} GiB", end=end, file=sys.stderr)

    return report


def run(args: argparse.Namespace) -> int:
    """Run the parsed subcommand: 0 if it succeeded (or the status it returned), 1 if files
    or a signature failed a check (each problem on its own line), 2 if the registry refused
    the request."""
    try:
        status = args.action(args)
    except IntegrityError as error:
        count = len(error.problems)
        print(f"autoglm: error: {error.label} failed its integrity check:", file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)
        print(f"{count} problem{'s' if count != 1 else ''}.", file=sys.stderr)
        return 1
    except SignatureError as error:
        print(f"autoglm: error: {error}", file=sys.stderr)
        return 1
    except RegistryError as error:
        print(f"autoglm: error: {error}", file=sys.stderr)
        return 2
    return status or 0
