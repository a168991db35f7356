"""What every command line of the suite shares: argument parsing whose errors are one line, ``--help`` that lists
each option with its default, the exit codes and an example, and the rule that a user error is one line on stderr
with exit code 2 (``-v`` adds the traceback).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import reprlib
import sys
import tempfile
import traceback
import unicodedata
from pathlib import Path
from typing import Any, NoReturn

#: Longest echo of a user's value in an error message (a YAML alias bomb must not print megabytes).
ECHO_LIMIT = 200


def cut(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` on one line, cut to ``limit`` characters with a note of how much was cut."""
    text = " ".join(str(text).splitlines())
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def clip(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (see :func:`cut`). Containers are
    abbreviated while being written (``reprlib``), so a YAML alias bomb costs nothing to show."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 8, 8
    r.maxstring = r.maxother = r.maxlong = limit
    return cut(r.repr(value), limit)


#: Exit code of a user error (bad input, unusable file or store); the same as argparse's.
USAGE = 2


class UserError(ValueError):
    """A problem with what the user asked for; ``str(err)`` is one line naming the culprit and what would work."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless the help already says it, or it is a plain flag);
    description and epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        quiet = action.default in (None, False, argparse.SUPPRESS) or action.required
        if quiet or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line on stderr (exit 2), pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        raise SystemExit(USAGE)


def parser(prog: str, doc: str, exit_codes: dict[int, str], example: str) -> Parser:
    """A :class:`Parser` for ``prog`` with ``doc`` as description and an epilog of exit codes and an example."""
    codes = "\n".join(f"  {code}  {what}" for code, what in sorted(exit_codes.items()))
    epilog = f"exit codes:\n{codes}\n\nexample:\n  {example}"
    return Parser(prog=prog, description=doc, epilog=epilog, formatter_class=_Formatter)


def fail(message: str) -> int:
    """Print ``error: message`` as one line on stderr and return the user-error exit code."""
    sys.stderr.write(f"error: {' '.join(str(message).splitlines())}\n")
    return USAGE


def report_user_error(err: BaseException, verbose: bool = False) -> int:
    """One line for ``err`` (with the traceback too when ``verbose``); returns exit code 2."""
    if verbose:
        traceback.print_exception(err)
    return fail(str(err))


def check_writable_dir(path: Path, what: str, shown: Path | None = None) -> Path:
    """Make sure files can be created in folder ``path`` (created if missing) by creating and removing one;
    raises :class:`UserError` naming ``what`` and ``shown`` (default ``path``) otherwise. Works for root too (a
    read-only file system refuses)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".editbench-write-test"):
            pass
    except OSError as e:
        raise UserError(f"{what} {shown or path}: not writable ({e.strerror or e})") from None
    return path


def check_writable_file(path: Path, what: str) -> Path:
    """Make sure ``path`` can be written (its folder writable, the file itself not a folder or read-only)."""
    if path.is_dir():
        raise UserError(f"{what} {path}: is a directory; give a file name")
    check_writable_dir(path.parent if str(path.parent) else Path("."), what, shown=path)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path}: not writable")
    return path


def control_characters(text: str) -> list[str]:
    """The control characters in ``text`` (Unicode category Cc/Cs: NUL, tabs, newlines, escapes, lone
    surrogates), each as ``repr`` shows it; empty when there is none."""
    return sorted({repr(c) for c in text if unicodedata.category(c) in ("Cc", "Cs")})


def slug(text: str, max_len: int = 80) -> str:
    """A readable file-name form of user text, safe as one path component: letters, digits, ``.``, ``_`` and
    ``-`` are kept, any other run of characters becomes ``-``, leading dots and dashes are dropped (no ``..``, no
    hidden file), and a name that changed or was long gets 8 hex of its sha256 so two names never share a slug.
    Never empty."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-") or "unnamed"
    if s == text and len(s) <= max_len:
        return s
    tag = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{s[: max_len - 9].rstrip('.-')}-{tag}"


def inside(root: Path, name: str, what: str) -> Path:
    """``root / name`` after checking that it resolves inside ``root`` (``name`` is one component made by
    :func:`slug`, so this holds unless someone bypassed it); raises :class:`UserError` naming ``what``."""
    path = root / name
    base = root.resolve()
    if path.resolve() != base and base not in path.resolve().parents:
        raise UserError(f"{what} {cut(name)}: resolves outside {root} ({path.resolve()}); names become one "
                        f"folder inside it")
    return path


def setup_logging(verbose: bool) -> None:
    """INFO with ``-v``, else WARNING, on stderr."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
