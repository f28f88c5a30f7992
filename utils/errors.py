"""User errors and the runner that turns them into one line on stderr.

A `UserError` is a mistake in the user's input (config, paths, data, checkpoints, command
line), not in the code: the entry points print it as one line, `error: <message>`, and exit
with status 2. `--debug` on the command line (or LIGHTNINGDOT_DEBUG=1 in the environment)
shows the full traceback instead. Any other exception is a programming error and keeps its
traceback (exit status 1).

This module imports nothing of the project, so every package can raise these errors.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

DEBUG_FLAG = "--debug"
DEBUG_ENV = "LIGHTNINGDOT_DEBUG"
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input: config, paths, data, checkpoints, command line; printed as one line."""


class ConfigError(UserError, ValueError):
    """A config file, config section or override that cannot be used as it is."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or directory the user named (or the config points to) does not exist."""


class DataError(UserError, ValueError):
    """A database, dataset or results file whose content cannot be used as it is."""


class DataKeyError(UserError, KeyError):
    """An id or name (image, caption, meta entry) that a database does not hold."""


class UsageError(UserError, ValueError):
    """A command-line value or combination of flags that argparse cannot check by itself."""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """True when `--debug` is in `argv` or LIGHTNINGDOT_DEBUG is set to a true value."""
    if argv is not None and DEBUG_FLAG in argv:
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def error_message(err: BaseException) -> str:
    """The message of `err` as the user should read it.

    KeyError's str() is the repr of its message, so the message is taken from `args`. An
    error re-raised from a DataLoader worker carries the worker's traceback in its message;
    only its last line (the original message) is kept.
    """
    if len(err.args) == 1 and isinstance(err.args[0], str):
        msg = err.args[0]
    else:
        msg = str(err)
    msg = str(msg)
    if "\nOriginal Traceback" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1]
        name, sep, rest = last.partition(": ")
        msg = rest if sep and " " not in name else last
    return msg.strip() or type(err).__name__


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)` and return the process exit status.

    Args:
        main: the entry point; it receives the arguments without `--debug`.
        argv: command-line arguments; `sys.argv[1:]` when None.

    Returns:
        `main`'s return value when it is an int (an exit status), else 0; 2 after a
        `UserError`, whose message is printed to stderr as `error: <message>`. With `--debug`
        or LIGHTNINGDOT_DEBUG=1 the `UserError` propagates, so its traceback shows. Other
        exceptions always propagate (argparse's usage errors keep their exit status 2).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        result = main(args)
    except UserError as err:
        if debug:
            raise
        print(f"error: {error_message(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 0
