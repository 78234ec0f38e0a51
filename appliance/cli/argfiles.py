"""Files named on the command line: read and written with one clear error that names the option.

A missing `--csr` file, an unreadable `--chain`, a `--cert` that is not PEM, or an `--out` that is a symlink
must end the command with one line saying which argument and why (exit 2), never a traceback; while a bug in
the code still shows its traceback. So every argument naming a file goes through here, and only the errors of
opening and parsing that file are turned into ArgumentFileError (a BirthlineError, which main() prints).

Outputs are written with appliance.files: created new and renamed into place, never through a link; private
keys 0600, everything else 0644.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from appliance.errors import BirthlineError, ReasonCode
from appliance.files import PUBLIC, FileRefused, write_file


class ArgumentFileError(BirthlineError):
    def __init__(self, option: str, path: str | Path, why: str) -> None:
        super().__init__(f"{option} {path}: {why}", ReasonCode.BAD_REQUEST, {"option": option})

    def __str__(self) -> str:
        return self.message


def _why(exc: OSError) -> str:
    return exc.strerror.lower() if exc.strerror else str(exc)


def read_bytes(option: str, path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except IsADirectoryError:
        raise ArgumentFileError(option, path, "is a directory, not a file") from None
    except OSError as exc:
        raise ArgumentFileError(option, path, _why(exc)) from None


def read_text(option: str, path: str | Path) -> str:
    data = read_bytes(option, path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArgumentFileError(option, path, f"not UTF-8 text (byte {exc.start})") from None


@contextlib.contextmanager
def parsing(option: str, path: str | Path, what: str) -> Iterator[None]:
    """Turn a parser's ValueError about the file's content (cryptography's "Unable to load PEM", a bad DER
    length) into ArgumentFileError saying what was expected."""
    try:
        yield
    except ValueError as exc:
        raise ArgumentFileError(option, path, f"not {what}: {exc}") from None


def new_file(option: str, path: str | Path) -> None:
    """Refuse now, before anything is done, an output that write(..., replace=False) would refuse later: something
    is at `path`, or its directory is missing."""
    p = Path(path)
    if os.path.lexists(p):
        raise ArgumentFileError(option, path, "exists; name a new file")
    if not p.parent.is_dir():
        raise ArgumentFileError(option, path, "its directory does not exist")


def write(option: str, path: str | Path, data: bytes, *, mode: int = PUBLIC, replace: bool = True) -> Path:
    try:
        return write_file(Path(path), data, mode=mode, replace=replace)
    except FileRefused as exc:
        raise ArgumentFileError(option, path, exc.message.removeprefix(f"{path} ")) from None
    except IsADirectoryError:
        raise ArgumentFileError(option, path, "is a directory") from None
    except FileExistsError:
        raise ArgumentFileError(option, path, "exists; name a new file") from None
    except OSError as exc:
        raise ArgumentFileError(option, path, _why(exc)) from None
