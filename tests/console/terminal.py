"""A real terminal for the dashboard's tests: tmux on a private server socket, read with capture-pane.

Each Terminal has its own tmux server (-L), so tests never see or disturb another tmux (another engineer's, the
acceptance check's); closing it ends only that server.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

TMUX = shutil.which("tmux")
needs_tmux = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (make test installs it)")


class Terminal:
    def __init__(
        self, command: str, *, width: int = 80, height: int = 24, env: dict[str, str] | None = None
    ) -> None:
        assert TMUX is not None
        self.server = f"bl-test-{os.getpid()}-{secrets.token_hex(4)}"
        self.target = "t"
        environ = {**os.environ, **(env or {}), "TERM": "xterm-256color"}
        self._tmux("new-session", "-d", "-s", self.target, "-x", str(width), "-y", str(height), command,
                   env=environ)  # fmt: skip

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        assert TMUX is not None
        out = subprocess.run([TMUX, "-L", self.server, *args], capture_output=True, text=True, timeout=30,
                             check=False, env=env)  # fmt: skip
        if out.returncode != 0 and args[0] not in ("kill-server", "capture-pane", "display-message"):
            raise AssertionError(f"tmux {' '.join(args)}: {out.stderr}")
        return out.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.target)

    def raw_screen(self) -> str:
        """The pane with its attributes, as tmux re-renders them (-e): the escapes here are tmux's own."""
        return self._tmux("capture-pane", "-p", "-e", "-t", self.target)

    def title(self) -> str:
        return self._tmux("display-message", "-p", "-t", self.target, "#{pane_title}").strip()

    def pid(self) -> int:
        return int(self._tmux("display-message", "-p", "-t", self.target, "#{pane_pid}").strip())

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.target, *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", self.target, "-l", text)

    def paste_file(self, path: Path) -> None:
        """Type a file's content (a password) without it ever being in an argument list."""
        self._tmux("load-buffer", "-b", "secret", str(path))
        self._tmux("paste-buffer", "-d", "-b", "secret", "-t", self.target)

    def wait_for(self, condition: Callable[[str], object], what: str, timeout: float = 60.0) -> str:
        """The screen once `condition(screen)` holds (a deadlock guard, not a timing assertion)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if condition(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"never: {what}\n{screen}")
            time.sleep(0.2)

    def close(self) -> None:
        self._tmux("kill-server")


def station_row(screen: str, name: str) -> tuple[str, int] | None:
    """(state, issued) of a station's row in the grid, or None when it is not on the screen."""
    m = re.search(rf"(?m)\b{re.escape(name)}\s+\S\s+(\w+)\s+(\d+)\b", screen)
    return (m[1], int(m[2])) if m else None


def grid_position(screen: str, name: str) -> int:
    """The 0-based row of a station in the grid as the screen shows it (the cursor starts on row 0), so a test
    moves to it by pressing Down that many times whatever stations the demo adds."""
    rows = re.findall(r"(?m)^\s*(?:\S+\s+)?(demo-[\w-]+)\s+\S\s+\w+\s+\d+\b", screen)
    assert name in rows, f"{name} not in the grid: {rows}\n{screen}"
    return rows.index(name)
