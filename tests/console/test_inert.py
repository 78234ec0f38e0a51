"""inert(): text from stations, devices and people is shown with every control, format and separator character
spelled out, and the widgets never read it as markup."""

from __future__ import annotations

import io
import unicodedata

import pytest
from rich.console import Console

from console.dashboard.inert import ELLIPSIS, inert
from console.dashboard.widgets import plain

HOSTILE = [
    "\x1b[2J\x1b[H",  # CSI: clear the screen, home
    "\x1b]0;pwned\x07",  # OSC: retitle the terminal
    "\x1b]52;c;cHduZWQ=\x07",  # OSC 52: write the clipboard
    "\x1bP+q544e\x1b\\",  # DCS: query the terminal
    "\x9b31m",  # C1 CSI
    "a\x00b\x7fc\x08d\re\nf\tg",  # NUL, DEL, backspace, CR, LF, TAB
    "\u202eevil\u202c",  # bidi override
    "\u2066x\u2069\u200b\u200d\ufeff",  # isolates, zero-width characters, BOM
    "line\u2028para\u2029",  # line and paragraph separators
    "\ud800",  # a lone surrogate
    "\ue000",  # private use
    "\U000e0001tag",  # a tag character
]


@pytest.mark.parametrize("value", HOSTILE, ids=[repr(v)[:20] for v in HOSTILE])
def test_no_control_format_or_separator_character_survives(value: str) -> None:
    shown = inert(value)
    assert all(
        unicodedata.category(ch)[0] != "C" and unicodedata.category(ch) not in ("Zl", "Zp") for ch in shown
    )
    assert "\\x" in shown or "\\u" in shown or "\\U" in shown


def test_escapes_are_spelled_and_unambiguous() -> None:
    assert inert("A\x1b[31mB") == "A\\x1b[31mB"
    assert inert("\u202e") == "\\u202e"
    assert inert("\U000e0001") == "\\U000e0001"
    # A peer who types a backslash-x cannot pass for an escape character: the backslash is doubled.
    assert inert("\\x1b") == "\\\\x1b" != inert("\x1b")
    assert inert("Müller Straße 5 – 東京") == "Müller Straße 5 – 東京"  # printable text stays itself
    assert inert(None) == "" and inert(42) == "42"


def test_long_text_is_cut_with_an_ellipsis() -> None:
    assert inert("x" * 200, limit=10) == "x" * 10 + ELLIPSIS
    assert inert("\x1b" * 200, limit=3) == "\\x1b" * 3 + ELLIPSIS  # cut on characters of the original
    assert inert("x" * 10, limit=10) == "x" * 10


@pytest.mark.parametrize("markup", ["[bold red]X[/]", "[@click=app.quit]quit[/]", "[link=http://x]y[/link]"])
def test_markup_is_shown_literally(markup: str) -> None:
    console = Console(
        file=io.StringIO(), width=80, force_terminal=True, color_system="truecolor", record=True
    )
    console.print(plain(markup + "\x1b[5m"))
    out = console.export_text(styles=False)
    assert markup in out and "\\x1b[5m" in out and "\x1b" not in out
