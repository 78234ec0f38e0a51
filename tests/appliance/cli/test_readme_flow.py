"""The README's "Setting up an appliance" block, run command by command (passwords on standard input), so the
documented flow cannot drift from the code. `birthline run` is left out: the daemon has its own tests."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from hsm.softhsm import create_softhsm_token

README = Path(__file__).resolve().parents[3] / "README.md"
PASSWORDS = {"alice": "alice password 1", "sam": "sam password 1"}


def _commands() -> list[list[str]]:
    block = re.search(r"## Setting up an appliance\n.*?```sh\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    text = block.group(1).replace("\\\n", " ")
    commands = []
    for raw in text.splitlines():
        line = raw.split("  #", 1)[0].strip()
        if line:
            commands.append(shlex.split(line))
    return commands


def _stdin(argv: list[str]) -> str:
    """What a person types: their own password, then a new user's password when one is created."""
    lines = []
    if "--user" in argv:
        lines.append(PASSWORDS[argv[argv.index("--user") + 1]])
    if argv[:2] == ["user", "add"]:
        lines.append(PASSWORDS[argv[2]])
    return "".join(f"{x}\n" for x in lines)


def test_readme_setup_flow_runs(tmp_path: Path) -> None:
    # Its own token, used from subprocesses only: the flow creates CAs named root and issuing, which must not
    # collide with the session token's (and SoftHSM reads its configuration once per process).
    cfg = create_softhsm_token(tmp_path / "softhsm", label="readme").hsm_config()
    config = tmp_path / "birthline.toml"
    config.write_text(
        f'[appliance]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[hsm]\nmodule = "{cfg.module}"\ntoken_label = "{cfg.token_label}"\npin_file = "{cfg.pin_file}"\n'
        f'softhsm_conf = "{cfg.softhsm_conf}"\n[stations]\nlan_listen = "127.0.0.1:7450"\ntls_dir = "tls"\n'
    )
    commands = _commands()
    assert [c[1] for c in commands[:3]] == ["init", "audit", "user"]
    ran, out = 0, ""
    for argv in commands:
        assert argv[0] == "birthline"
        args = [a for a in argv[1:] if a != "$C"]
        if args[0] == "run":
            continue
        if "--user" in args or args[:2] == ["user", "add"]:
            args.append("--password-stdin")
        proc = subprocess.run(
            [sys.executable, "-m", "appliance.cli.main", *args, "--config", str(config)],
            input=_stdin(args), capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, (args, proc.stderr)
        out += proc.stdout
        ran += 1
    assert ran >= 14
    assert "planned" in out and "500" in out  # the report of the work order the block created
    assert "INTACT" in out  # the auditor's verify with the pinned key
