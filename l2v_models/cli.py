"""The `l2v` command line: the dispatcher.

    l2v encode "A cat sits on the mat." "A kitten rests on a rug."   # l2v_models.encode_cli
    l2v info [--model M]                                               # l2v_models.info_cli
    l2v serve | encode-corpus | train | eval                           # their packages' cli.py

Each command lives next to its feature and shares the model options of
l2v_models.model_options.

Errors a user can fix (missing file, bad JSONL line, unknown or damaged model, bad option
value) end with one line `l2v: error: ...` and exit code 2; any other error (a bug) also prints
one line, with exit code 1. `l2v --debug ...` (or L2V_DEBUG=1) shows the traceback instead.
Library warnings (e.g. empty texts) are printed as `l2v: warning: ...`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

from l2v_models.errors import UsageError

# Subcommands that live next to their feature. Each module has `add_parser(subparsers)`, which
# adds its parser with set_defaults(func=...); it is imported while the parser is built, so it
# must import lightly (argparse only, heavy imports inside func).
FEATURE_COMMANDS: tuple[str, ...] = (
    "l2v_models.encode_cli",  # l2v encode
    "l2v_models.info_cli",  # l2v info
    "l2v_models.serve.cli",  # l2v serve
    "l2v_models.corpus.cli",  # l2v encode-corpus
    "l2v_models.train.cli",  # l2v train
    "l2v_models.eval.cli",  # l2v eval
    "l2v_models.export_cli",  # l2v export
)


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2v", description="The fastest exact encoder for decoder-based text embedders."
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    for module in FEATURE_COMMANDS:
        importlib.import_module(module).add_parser(sub)
    for command in sub.choices.values():  # `l2v encode --debug` works as `l2v --debug ...`
        if "--debug" not in command._option_string_actions:
            command.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
            )
    return parser


_DEBUG_HELP = "on an error, show the Python traceback (also: L2V_DEBUG=1)"
# Errors with a message written for the user: one line, exit code 2.
_EXPECTED_ERRORS = (UsageError, OSError, ValueError, TypeError, ImportError, RuntimeError,
                    MemoryError)  # fmt: skip
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _one_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _WarningsToStderr:
    """While active: the package's log records of level WARNING and above are printed to stderr
    as `l2v: warning: ...` (Python logging; nothing else is configured)."""

    def __enter__(self):
        self.logger = logging.getLogger("l2v_models")
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setLevel(logging.WARNING)
        self.handler.setFormatter(logging.Formatter("l2v: %(levelname_lower)s: %(message)s"))
        self.handler.addFilter(_lower_level)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        return False


def _lower_level(record: logging.LogRecord) -> bool:
    record.levelname_lower = record.levelname.lower()
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for a user error, 1 for a bug, 130 on
    Ctrl-C). Errors print one `l2v: error: ...` line; --debug / L2V_DEBUG=1 re-raise them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("L2V_DEBUG", "") not in ("", "0")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    try:
        with _WarningsToStderr():
            args = build_parser().parse_args(argv)
            debug = debug or getattr(args, "debug", False)
            return args.func(args)
    except KeyboardInterrupt:
        print("l2v: interrupted", file=sys.stderr)
        return 130
    except _EXPECTED_ERRORS as e:
        if debug:
            raise
        message = _one_line(e)
        if not isinstance(e, (UsageError, OSError, ValueError)):
            message = f"{type(e).__name__}: {message}"
        print(f"l2v: error: {message}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(
            f"l2v: error: internal error ({type(e).__name__}: {_one_line(e)}); please report it "
            "with the traceback that `l2v --debug ...` prints",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
