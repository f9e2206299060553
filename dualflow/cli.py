"""Command-line plumbing shared by ``scripts/``: one ``error:`` line per mistake.

A script does three things with this module::

    from dualflow import cli

    _CONFIG = cli.define_config_file("config", "configs/uci.py", "...")
    ...
    def main(argv): ...          # may call cli.fail("...") or raise a DualflowError
    if __name__ == "__main__":
        cli.run(main)

and then every user mistake — an unknown or badly typed config field, a missing
or broken config file, an unexpected argument, missing or malformed data, an
unreadable checkpoint, a diverged run — ends in one ``error: ...`` line (plus at
most one ``hint: ...`` line) on stderr and exit code 2 (:data:`EXIT_USAGE`).
``dualflow.errors.Interrupted`` and a bare Ctrl-C exit with 130
(:data:`EXIT_INTERRUPTED`) and one line.  Other exceptions are bugs and keep
their traceback.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, NoReturn

from dualflow.errors import DualflowError, Interrupted

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "define_config_file",
    "fail",
    "run",
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


def _flag_error_message(err: BaseException, argv: list[str]) -> str:
    """One line for a flag-parsing failure (absl or a config file's loader)."""
    cause = _root_cause(err)
    if isinstance(cause, SyntaxError) or isinstance(err, SyntaxError):
        syn = cause if isinstance(cause, SyntaxError) else err
        return (
            f"config file {syn.filename} is not a Python config file"
            f" (line {syn.lineno}: {syn.msg}); pass --config=configs/<name>.py"
        )
    text = str(err)
    missing = re.search(r"Attempted \[[^\]]*\]:\s*(\S+)\s*\[Errno 2\]", text)
    if missing or isinstance(cause, FileNotFoundError):
        path = missing.group(1) if missing else getattr(cause, "filename", "?")
        return f"config file {path} does not exist; pass --config=configs/<name>.py"
    if "Error whilst parsing config file" in text or "get_config" in str(cause):
        return f"could not load the config: {_one_line(str(cause).splitlines()[-1])}"
    return _one_line(text.splitlines()[0] if text else repr(err))


def _parse_flags(argv: list[str]) -> list[str]:
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        for name in list(flags.FLAGS):  # config files load lazily: touch them
            flag = flags.FLAGS[name]
            if type(flag).__name__ == "_ConfigFlag" and flag.value is not None:
                getattr(flag.value, "keys", None)
        return rest
    except (flags.Error, OSError, SyntaxError, ValueError, TypeError) as err:
        fail(_flag_error_message(err, argv), "see --helpshort for the flags")
    except (AttributeError, KeyError) as err:  # override of a missing field
        fail(*_unknown_field_message(err, argv, "config"))


def run(main: Callable[[list[str]], int | None]) -> None:
    """``absl.app.run(main)`` with one-line errors and exit codes 2 / 130."""
    from absl import app

    def guarded(argv: list[str]):
        try:
            return main(argv)
        except app.UsageError as err:
            fail(str(err))
        except DualflowError as err:
            fail(str(err), err.hint)
        except Interrupted as err:
            print(_one_line(str(err)), file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None

    app.run(guarded, flags_parser=_parse_flags)
