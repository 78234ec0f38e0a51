"""Issue 17 item 10: `birthline --help` and the read-only commands start without importing the appliance's heavy
parts (CMP's ASN.1 modules, aiohttp, the issuance pipeline, the daemon). What they cost in seconds is measured
by bench/startup.py; these tests check, without timing anything, that the heavy modules stay out."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli.main import COMMANDS, build_parser
from hsm.softhsm import SoftHsmToken

ROOT = Path(__file__).resolve().parents[3]
# Importing a module from the list below (or one under it) is what makes a command cost seconds.
HEAVY = ("pyasn1_alt_modules", "aiohttp", "appliance.cmp", "appliance.daemon", "appliance.issuance.service",
         "stations.client", "multiprocessing")  # fmt: skip
NOT_FOR_HELP = (*HEAVY, "cryptography", "pkcs11", "asyncio", "sqlite3", "appliance.config", "hsm")

_PROBE = """
import contextlib, io, json, sys
from appliance.cli.main import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "out": out.getvalue(), "modules": sorted(sys.modules)}))
"""


def _run(*argv: str) -> tuple[int, str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    return int(result["code"]), str(result["out"]), list(result["modules"])


def _loaded(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_the_command_table_is_what_the_modules_register() -> None:
    """main.COMMANDS lists each command's module and help so that --help imports none of them: it must say
    exactly what the modules' own parsers say."""
    parser = build_parser(everything=True)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    shown = {a.dest: a.help for a in sub._choices_actions}
    assert {name: help_text for name, (_, help_text) in COMMANDS.items()} == shown
    for name, (module, _) in COMMANDS.items():
        alone = build_parser(name)
        alone_sub = next(a for a in alone._actions if isinstance(a, argparse._SubParsersAction))
        # The command's own parser has its arguments; a placeholder has none beyond -h.
        assert alone_sub.choices[name]._actions[1:], f"{name} is not registered by appliance.cli.{module}"


def test_help_imports_no_part_of_the_appliance() -> None:
    code, out, modules = _run("--help")
    assert code == 0 and "init" in out and "workorder" in out
    assert _loaded(modules, NOT_FOR_HELP) == []


@pytest.fixture
def config(softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copy(production_journal_template, state / "journal.sqlite")
    cfg = softhsm_token.hsm_config()
    path = tmp_path / "birthline.toml"
    path.write_text(
        f'[appliance]\nstate_dir = "{state}"\n'
        f'[hsm]\nmodule = "{cfg.module}"\ntoken_label = "{cfg.token_label}"\npin_file = "{cfg.pin_file}"\n'
        f'softhsm_conf = "{cfg.softhsm_conf}"\n'
    )
    return path


READ_ONLY = (
    ["ca", "list"], ["ca", "chain"], ["journal", "stats"], ["report", "workorder", "WO-1"], ["workorder", "list"],
    ["upstream", "status"], ["station", "list"], ["revocation", "list"], ["user", "list"], ["audit", "head"],
    ["ocsp", "status", "--cert-serial", "1"],
)  # fmt: skip


@pytest.mark.parametrize("argv", READ_ONLY, ids=" ".join)
def test_read_only_commands_import_only_what_they_need(config: Path, argv: list[str]) -> None:
    code, _, modules = _run(*argv, "--config", str(config))
    assert code == 0
    assert _loaded(modules, HEAVY) == []
