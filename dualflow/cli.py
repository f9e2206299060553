"""Command-line plumbing shared by ``scripts/``: one ``error:`` line per mistake.

A script does three things with this module::

    from dualflow import cli

    _CONFIG = cli.define_config_file("config", "configs/uci.py", "...")
    ...
    def main(argv): ...          # may call cli.fail("...") or raise a DualflowError
    if __name__ == "__main__":
        cli.run(main)

(an argparse script builds its parser with :func:`argument_parser` and ends
with ``cli.run_plain(main)``; :func:`parse_list` checks comma-separated flag
values) and then every user mistake — an unknown or badly typed config field, a
missing or broken config file, an unexpected argument, a bad flag value,
missing or malformed data, an unreadable checkpoint, a diverged run — ends in
one ``error: ...`` line (plus at most one ``hint: ...`` line) on stderr and
exit code 2 (:data:`EXIT_USAGE`).
``dualflow.errors.Interrupted`` and a bare Ctrl-C exit with 130
(:data:`EXIT_INTERRUPTED`) and one line.  Other exceptions are bugs and keep
their traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from dualflow.errors import DualflowError, Interrupted

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "argument_parser",
    "define_config_file",
    "diverged",
    "fail",
    "parse_list",
    "quick_defaults",
    "run",
    "run_plain",
]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(message: str, hint: str | None = None) -> NoReturn:
    """Report a user mistake: ``error: message`` (and ``hint: ...``), exit 2."""
    print(f"error: {_one_line(message)}", file=sys.stderr)
    if hint:
        print(f"hint: {_one_line(hint)}", file=sys.stderr)
    sys.stderr.flush()
    raise SystemExit(EXIT_USAGE)


def diverged(err: FloatingPointError, hint: str | None = None) -> NoReturn:
    """Report a diverged run (a library's ``FloatingPointError`` or a
    :class:`~dualflow.errors.DivergenceError`) in one line, exit 2; the
    error's own hint, if any, wins over ``hint``."""
    fail(str(err), getattr(err, "hint", None) or hint)


def _config_override_args(argv: list[str], name: str) -> list[str]:
    return [a for a in argv[1:] if a.startswith(f"--{name}.")]


def _unknown_field_message(err: BaseException, argv: list[str], name: str):
    """(message, hint) for an override naming a field the config lacks."""
    text = str(err).strip("\"'").replace("\\n", "\n").replace("\\'", "'")
    key = text.splitlines()[0].strip("\"' ") if text else "?"
    guess = re.search(r'Did you mean "([^"]+)"', text)
    args = [a for a in _config_override_args(argv, name) if key in a.split("=")[0]]
    arg = args[0].split("=")[0] if args else f"--{name}.…{key}"
    hint = f"did you mean {guess.group(1)!r}?" if guess else None
    return f"{arg}: the config has no field {key!r}", hint


def define_config_file(name: str, default: str, help_string: str, **kwargs):
    """``config_flags.DEFINE_config_file`` whose override mistakes end in one line.

    ml_collections parses ``--<name>.field=value`` overrides while the flag is
    being defined (at import of the script), so an unknown field would
    otherwise surface as a chain of tracebacks.
    """
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
    except (AttributeError, KeyError) as err:
        fail(*_unknown_field_message(err, sys.argv, name))


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or (
        err.__context__ is not None and not err.__suppress_context__
    ):
        err = err.__cause__ or err.__context__
    return err


def _flag_error_message(
    err: BaseException, argv: list[str], config_flag: str = "config"
) -> str:
    """One line for a flag-parsing failure (absl or a config file's loader)."""
    cause = _root_cause(err)
    use = f"pass --{config_flag}=configs/<name>.py"
    if isinstance(cause, SyntaxError) or isinstance(err, SyntaxError):
        syn = cause if isinstance(cause, SyntaxError) else err
        return (
            f"config file {syn.filename} is not a Python config file"
            f" (line {syn.lineno}: {syn.msg}); {use}"
        )
    text = str(err)
    missing = re.search(r"Attempted \[[^\]]*\]:\s*(\S+)\s*\[Errno 2\]", text)
    if missing or isinstance(cause, FileNotFoundError):
        path = missing.group(1) if missing else getattr(cause, "filename", "?")
        return f"config file {path} does not exist; {use}"
    if "Error whilst parsing config file" in text or "get_config" in str(cause):
        return f"could not load the config: {_one_line(str(cause).splitlines()[-1])}"
    return _one_line(text.splitlines()[0] if text else repr(err))


def _config_flag_names(flag_values) -> list[str]:
    """Names of the ml_collections config flags among ``flag_values``."""
    return [
        name
        for name in list(flag_values)
        if type(flag_values[name]).__name__ == "_ConfigFlag"
    ]


def _parse_flags(argv: list[str], flag_values=None) -> list[str]:
    """``flag_values(argv)`` (default ``absl.flags.FLAGS``) with every mistake
    -- unknown flag, bad value, missing or broken config file, override of a
    missing config field -- reported by :func:`fail`; returns the positional
    arguments (``argv[0]`` first)."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    try:
        rest = flag_values(argv)
        for name in _config_flag_names(flag_values):  # config files load lazily
            if flag_values[name].value is not None:
                getattr(flag_values[name].value, "keys", None)
        return rest
    except (flags.Error, OSError, SyntaxError, ValueError, TypeError) as err:
        names = _config_flag_names(flag_values) or ["config"]
        given = [n for n in names if any(a.startswith(f"--{n}=") for a in argv)]
        message = _flag_error_message(err, argv, (given or names)[0])
        fail(message, "see --helpshort for the flags")
    except (AttributeError, KeyError) as err:  # override of a missing field
        names = _config_flag_names(flag_values) or ["config"]
        used = [n for n in names if _config_override_args(argv, n)]
        fail(*_unknown_field_message(err, argv, (used or names)[0]))


def _guarded(main: Callable[..., int | None], *args: Any) -> int | None:
    """Call ``main(*args)``; user errors end in one line and exit 2 / 130."""
    from absl import app

    try:
        return main(*args)
    except app.UsageError as err:
        fail(str(err))
    except DualflowError as err:
        text = str(err)
        if err.hint and "\n" in text.strip():  # details are for API users
            text = text.strip().splitlines()[0]
        fail(text, err.hint)
    except Interrupted as err:
        print(_one_line(str(err)) or "interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


def run(main: Callable[[list[str]], int | None], *, allow_args: bool = True) -> None:
    """``absl.app.run(main)`` with one-line errors and exit codes 2 / 130.

    With ``allow_args=False`` positional arguments (left over after the flags)
    are refused in one line before ``main`` runs.
    """
    from absl import app

    def guarded(argv: list[str]):
        if not allow_args and len(argv) > 1:
            fail(f"unexpected arguments: {' '.join(argv[1:])}")
        return _guarded(main, argv)

    app.run(guarded, flags_parser=_parse_flags)


def run_plain(main: Callable[[], int | None]) -> NoReturn:
    """Run an argparse script's ``main()`` (it parses ``sys.argv`` itself) with
    the one-line errors and exit codes of :func:`run`; exit with its return."""
    raise SystemExit(_guarded(main))


class _OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one ``error:`` line, exit 2."""

    def error(self, message: str) -> NoReturn:
        """Report a bad command line the :func:`fail` way (no usage block)."""
        fail(message, f"see {self.prog} --help")


def argument_parser(
    description: str | None = None, **kwargs: Any
) -> argparse.ArgumentParser:
    """``argparse.ArgumentParser`` whose mistakes (unknown or missing arguments,
    bad values, ``parser.error(...)``) end in one ``error:`` line and exit 2."""
    return _OneLineParser(description=description, **kwargs)


_TYPE_NAMES = {int: "an integer", float: "a number"}


def parse_list(
    value: str | Sequence[str],
    flag: str,
    *,
    choices: Sequence[str] | None = None,
    type: Callable[[str], Any] = str,  # noqa: A002  (argparse's name)
    allow_empty: bool = False,
) -> list:
    """A comma-separated flag value as a list, or one ``error:`` line naming
    ``--flag`` (and the valid ``choices``) for an unknown or badly typed item.

    ``value`` may be a string or an absl list flag's list of strings.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(v).strip() for v in items if str(v).strip()]
    allowed = f"; choose from {', '.join(map(str, choices))}" if choices else ""
    if not items and not allow_empty:
        fail(f"--{flag}: no value given{allowed}")
    if choices is not None:
        bad = [v for v in items if v not in choices]
        if bad:
            fail(f"--{flag}: unknown {', '.join(map(repr, bad))}{allowed}")
    out = []
    for v in items:
        try:
            out.append(type(v))
        except (TypeError, ValueError):
            what = _TYPE_NAMES.get(
                type, f"a valid {getattr(type, '__name__', 'value')}"
            )
            fail(f"--{flag}: {v!r} is not {what}")
    return out


def quick_defaults(flag_values: Any, values: dict[str, Any]) -> list[str]:
    """Apply a script's ``--quick`` settings to the flags the user did not
    give: explicit flags win.  Returns the names that were kept as given."""
    kept = []
    for name, value in values.items():
        if flag_values[name].present:
            kept.append(name)
        else:
            setattr(flag_values, name, value)
    return kept
