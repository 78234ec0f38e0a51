"""Untrusted text: rendering it safely in messages, and telling whether it is clean.

Values from stations, MES files, CMP peers and command lines reach terminals, logs, the audit log and
dashboards; what a message shows of them is escaped here.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any, Final

# X.680 PrintableString, exactly. Many encoders also let '*', '@', '&' or '_' through; strict relying parties
# then reject the certificate, so we never emit them.
PRINTABLE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?")

# Longest rendering of an untrusted value we put in a message: the serial may be megabytes.
_SHOW_MAX: Final = 80


def safe_repr(value: str, limit: int = _SHOW_MAX) -> str:
    """A quoted, ASCII-only rendering of an untrusted string, cut to `limit` characters.

    Python's repr() keeps printable non-ASCII characters, which includes bidi overrides in some categories and
    look-alike letters; escaping everything outside printable ASCII leaves nothing for a terminal or a browser
    to interpret.
    """
    shown = value[:limit]
    out = []
    for ch in shown:
        code = ord(ch)
        if ch in "\\'":
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    suffix = f"...(+{len(value) - limit} chars)" if len(value) > limit else ""
    return "'" + "".join(out) + "'" + suffix


def is_clean_text(value: str) -> bool:
    """True when `value` has no control, format (bidi), surrogate or unassigned characters."""
    return all(unicodedata.category(ch)[0] != "C" for ch in value)


def load_json(text: str | bytes) -> Any:
    """json.loads for input from outside (an MES file, an export, a peer): every failure is a ValueError whose
    message is ours. The json module raises RecursionError for deep nesting and a plain ValueError for an
    integer of more than 4,300 digits; neither may escape as a traceback."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply") from None
    except ValueError:
        raise ValueError("not valid JSON: a number too long to read") from None
