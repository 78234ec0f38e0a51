"""Issue 17 item 3: commissioning the HSM token. `birthline hsm init-token` makes a SoftHSM token with PINs
from files, a terminal or generated (never argv), and never re-initialises one that exists; `birthline config
check` checks the PIN file's owner and mode, that the module loads, that the token exists and that the PIN logs
in, and for each failure says what to do.

Every command runs in its own process: SoftHSM reads its configuration once per process, and each test has a
token directory of its own."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hsm.softhsm import find_softhsm_module

ROOT = Path(__file__).resolve().parents[3]


def _config(tmp_path: Path, *, module: str | None = None, label: str = "line-1") -> Path:
    tmp_path.mkdir(exist_ok=True, mode=0o700)
    path = tmp_path / "birthline.toml"
    path.write_text(
        f'[appliance]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[hsm]\nmodule = "{module or find_softhsm_module()}"\ntoken_label = "{label}"\npin_file = "hsm.pin"\n'
        'softhsm_conf = "softhsm/softhsm2.conf"\n'
    )
    return path


def _birthline(*argv: str | Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", *map(str, argv)], input=stdin, capture_output=True,
        text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("birthline: ") and "Traceback" not in done.stderr, (
        done.stderr
    )
    return lines[0]


@pytest.fixture
def commissioned(tmp_path: Path) -> Path:
    config = _config(tmp_path)
    made = _birthline(
        "hsm", "init-token", "--generate", "--so-pin-file", tmp_path / "so.pin", "--config", config
    )
    assert made.returncode == 0, made.stderr
    assert "token 'line-1' initialised in slot" in made.stdout
    return config


def test_a_generated_token_passes_every_check(commissioned: Path, tmp_path: Path) -> None:
    for secret in (tmp_path / "hsm.pin", tmp_path / "so.pin"):
        assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_text().strip()) >= 24
    assert (tmp_path / "softhsm" / "tokens").stat().st_mode & 0o777 == 0o700
    checked = _birthline("config", "check", "--config", commissioned)
    assert checked.returncode == 0, checked.stderr
    lines = checked.stdout.splitlines()
    assert lines[1] == f"hsm.pin_file {tmp_path / 'hsm.pin'}: owned by root, mode 0600"
    assert lines[2] == (
        f"hsm.softhsm_conf {tmp_path / 'softhsm' / 'softhsm2.conf'}: readable; tokendir"
        f" {tmp_path / 'softhsm' / 'tokens'} readable and writable by root"
    )
    assert lines[3].startswith(f"hsm.module {find_softhsm_module()}: loads: SoftHSM")
    assert lines[4] == "hsm.token_label 'line-1': found, initialised, user PIN set"
    assert lines[5] == "hsm login to 'line-1': the PIN logs in"


def test_an_existing_token_is_never_initialised_again(commissioned: Path, tmp_path: Path) -> None:
    first = _birthline("init", "--config", commissioned, "--organisation", "Acme Devices")
    assert first.returncode == 0, first.stderr
    pins = (tmp_path / "hsm.pin").read_bytes(), (tmp_path / "so.pin").read_bytes()
    again = _one_line(_birthline("hsm", "init-token", "--generate", "--so-pin-file", tmp_path / "so.pin",
                                 "--config", commissioned))  # fmt: skip
    assert "a token labelled 'line-1' exists already; it is left as it is" in again
    assert ((tmp_path / "hsm.pin").read_bytes(), (tmp_path / "so.pin").read_bytes()) == pins
    second = _birthline("init", "--config", commissioned)
    assert second.returncode == 0, second.stderr
    # The keys the first `init` made (the management CA's, the audit key) are still in the token.
    keys = next(line for line in second.stdout.splitlines() if line.startswith("HSM token"))
    assert keys == "HSM token 'line-1': logged in, 2 key(s)"


def test_each_failed_check_says_what_to_do(commissioned: Path, tmp_path: Path) -> None:
    pin = tmp_path / "hsm.pin"
    good = pin.read_text()

    def check(config: Path = commissioned) -> str:
        return _one_line(_birthline("config", "check", "--config", config))

    pin.chmod(0o644)
    assert f"hsm.pin_file {pin}: group or others may read it (mode 0644): chmod 600 {pin}" in check()
    pin.chmod(0o600)
    os.chown(pin, 65534, -1)
    assert "owned by nobody, not by root who runs this check" in check() and f"chown root {pin}" in check()
    os.chown(pin, 0, -1)
    pin.rename(tmp_path / "real.pin")
    pin.symlink_to(tmp_path / "real.pin")
    assert "is not a regular file (a link or a device is refused)" in check()
    pin.unlink()
    (tmp_path / "real.pin").rename(pin)

    def shared_conf(config: Path) -> Path:  # this token's SoftHSM configuration, which the check reads first
        conf = f'softhsm_conf = "{tmp_path / "softhsm" / "softhsm2.conf"}"'
        config.write_text(config.read_text().replace('softhsm_conf = "softhsm/softhsm2.conf"', conf))
        return config

    missing = shared_conf(_config(tmp_path / "m", module=str(tmp_path / "nope.so")))
    (tmp_path / "m" / "hsm.pin").write_text(good)
    (tmp_path / "m" / "hsm.pin").chmod(0o600)
    assert "no such file: install the HSM's PKCS#11 library" in check(missing)
    not_pkcs11 = shared_conf(_config(tmp_path / "n", module=_some_shared_library()))
    (tmp_path / "n" / "hsm.pin").write_text(good)
    (tmp_path / "n" / "hsm.pin").chmod(0o600)
    assert "does not load as a PKCS#11 module" in check(not_pkcs11)

    other = tmp_path / "other.toml"
    other.write_text(commissioned.read_text().replace('token_label = "line-1"', 'token_label = "line-9"'))
    assert "hsm.token_label 'line-9': no such token (tokens seen: 'line-1'): initialise it" in check(other)

    pin.write_text("not-the-pin\n")
    err = check()
    assert "the PIN in the PIN source is wrong (PinIncorrect)" in err and "not retried" in err
    pin.write_text(good)
    assert _birthline("config", "check", "--config", commissioned).returncode == 0


def _some_shared_library() -> str:
    for candidate in ("/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1",
                      "/lib/aarch64-linux-gnu/libz.so.1", "/usr/lib/aarch64-linux-gnu/libz.so.1"):  # fmt: skip
        if Path(candidate).exists():
            return candidate
    pytest.skip("no libz.so.1 to stand for a library that is not a PKCS#11 module")


def test_pins_typed_at_a_terminal_and_never_from_a_pipe(tmp_path: Path) -> None:
    config = _config(tmp_path)
    piped = _birthline("hsm", "init-token", "--so-pin-file", tmp_path / "so.pin", "--config", config,
                       stdin="1234\n1234\n5678\n5678\n")  # fmt: skip
    assert "user PIN: no terminal to ask on: give --generate" in _one_line(piped)
    assert not (tmp_path / "hsm.pin").exists()

    out = _on_a_terminal(
        [sys.executable, "-m", "appliance.cli.main", "hsm", "init-token", "--so-pin-file", str(tmp_path / "so.pin"),
         "--config", str(config)],
        {"new user PIN: ": "user-pin-1234", "again, user PIN: ": "user-pin-1234",
         "new SO PIN: ": "so-pin-5678", "again, SO PIN: ": "so-pin-5678"},
    )  # fmt: skip
    assert "token 'line-1' initialised" in out and "user-pin-1234" not in out and "so-pin-5678" not in out
    assert (tmp_path / "hsm.pin").read_text() == "user-pin-1234\n"
    assert (tmp_path / "so.pin").read_text() == "so-pin-5678\n"
    assert _birthline("config", "check", "--config", config).returncode == 0


def _on_a_terminal(argv: list[str], answers: dict[str, str]) -> str:
    """Run argv with a pseudo-terminal as its controlling terminal, answering each prompt as it appears."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        os.chdir(ROOT)
        os.execv(argv[0], argv)  # noqa: S606 - a fixed argv of our own, no shell wanted
    seen, deadline = "", time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal: it has exited
                break
            if not chunk:
                break
            seen += chunk
            for prompt, answer in answers.items():
                if seen.endswith(prompt):
                    os.write(fd, f"{answer}\n".encode())
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    return seen


def test_init_names_the_appliance_after_its_organisation(commissioned: Path, tmp_path: Path) -> None:
    """Issue 17 item 1: `init` made a management CA named "Birthline Demo Management CA", with no option."""
    demo = _one_line(_birthline("init", "--organisation", "Birthline  demo", "--config", commissioned))
    assert "'Birthline Demo' is the demo's name; give your organisation's" in demo
    asked = _birthline("init", "--config", commissioned)  # no terminal to ask on
    assert "give --organisation NAME" in _one_line(asked)

    done = _birthline("init", "--organisation", "Acme Devices, Inc.", "--config", commissioned)
    assert done.returncode == 0, done.stderr
    assert "organisation 'Acme Devices, Inc.': the appliance's CAs are named after it" in done.stdout
    assert (
        "management CA 'management': CN=Acme Devices\\, Inc. Management CA,O=Acme Devices\\, Inc."
        in done.stdout
    )
    other = _one_line(_birthline("init", "--organisation", "Other Corp", "--config", commissioned))
    assert "this appliance was commissioned for 'Acme Devices, Inc.'" in other
    assert _birthline("init", "--config", commissioned).returncode == 0  # the recorded one, nothing asked

    admin = ["--user", "alice", "--password-stdin", "--config", str(commissioned)]
    assert (
        _birthline("user", "add", "alice", "--bootstrap", *admin[2:], stdin="alice pw 123\n").returncode == 0
    )
    root = _birthline("ca", "init-root", *admin, stdin="alice pw 123\n")
    assert root.returncode == 0, root.stderr
    assert "CN=Acme Devices\\, Inc. Device Root CA,O=Acme Devices\\, Inc." in root.stdout
    refused = _birthline("ca", "init-issuing", "--subject", "/O=Birthline Demo/CN=Line CA", *admin,
                         stdin="alice pw 123\n")  # fmt: skip
    assert "'Birthline Demo' names are the demo's" in _one_line(refused)
    issuing = _birthline("ca", "init-issuing", *admin, stdin="alice pw 123\n")
    assert "CN=Acme Devices\\, Inc. Birth Certificate CA" in issuing.stdout, issuing.stderr


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{pin}\nsecond\n", "has more than one line"),
        ("{pin}\r\n", "has a carriage return (a CRLF line end?)"),
        ("{pin} \n", "has blanks (spaces, tabs) before or after the PIN"),
        ("\t{pin}\n", "has blanks (spaces, tabs) before or after the PIN"),
        ("\n", "is empty"),
    ],
)
def test_a_pin_file_not_one_line_stops_the_check_before_any_login(
    commissioned: Path, tmp_path: Path, content: str, problem: str
) -> None:
    """Review finding 1: such a file passed the file step, then logged in once with the wrong PIN."""
    pin = tmp_path / "hsm.pin"
    good = pin.read_text().removesuffix("\n")
    pin.write_text(content.format(pin=good))
    done = _birthline("config", "check", "--config", commissioned)
    err = _one_line(done)
    assert f"PIN source {pin} {problem}: write the PIN alone on one line" in err
    assert good not in done.stdout + done.stderr
    assert "login" not in done.stdout  # no login was tried
    # The daemon's own reading applies the same rule (init logs in as the daemon does).
    assert problem in _one_line(
        _birthline("init", "--organisation", "Acme Devices", "--config", commissioned)
    )
    pin.write_text(good + "\n")
    assert _birthline("config", "check", "--config", commissioned).returncode == 0


def test_an_existing_label_is_refused_before_any_pin_file_is_written(
    commissioned: Path, tmp_path: Path
) -> None:
    """Review finding 2: a lost pin_file got a new random PIN, and a new --so-pin-file a decoy SO PIN."""
    (tmp_path / "hsm.pin").unlink()
    again = _one_line(_birthline("hsm", "init-token", "--generate", "--so-pin-file", tmp_path / "so2.pin",
                                 "--config", commissioned))  # fmt: skip
    assert "a token labelled 'line-1' exists already; it is left as it is" in again
    assert "no file was written" in again
    assert not (tmp_path / "hsm.pin").exists() and not (tmp_path / "so2.pin").exists()


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="birthline-owner-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_owner_gives_the_token_to_the_daemons_user_and_the_check_names_unreadable_files(
    open_tmp: Path,
) -> None:
    """Review finding 3: the conf and tokens stayed root's, and the check blamed the module (GeneralError)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run as another user")
    import pwd

    tmp_path = open_tmp
    nobody = pwd.getpwnam("nobody")
    config = _config(tmp_path / "c")
    (tmp_path / "c").chmod(0o755)
    config.chmod(0o644)

    # The venv's interpreter may live where nobody may not go (/root/.pyenv): the system's, with the venv's
    # packages, when it is the same Python.
    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.access(python, os.X_OK):
        pytest.skip(f"no {python} for another user to run")
    site = (
        Path(sys.prefix)
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / "site-packages"
    )

    def as_nobody(*argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, "-m", "appliance.cli.main", *map(str, argv)], capture_output=True, text=True,
            cwd="/", timeout=120, check=False, user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
            env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": f"{ROOT}:{site}"},
        )  # fmt: skip

    made = _birthline(
        "hsm", "init-token", "--generate", "--so-pin-file", tmp_path / "so.pin", "--config", config
    )
    assert made.returncode == 0, made.stderr
    conf = tmp_path / "c" / "softhsm" / "softhsm2.conf"
    os.chown(tmp_path / "c" / "hsm.pin", nobody.pw_uid, -1)
    err = _one_line(as_nobody("config", "check", "--config", config))
    assert f"hsm.softhsm_conf {conf}: nobody who runs this check cannot read it (owned by root)" in err
    assert "does not load" not in err
    conf.chmod(0o644)
    err = _one_line(as_nobody("config", "check", "--config", config))
    assert f"chown -R nobody {conf.parent / 'tokens'}" in err
    conf.chmod(0o600)

    config2 = _config(tmp_path / "d")
    (tmp_path / "d").chmod(0o755)
    config2.chmod(0o644)
    made = _birthline("hsm", "init-token", "--generate", "--owner", "nobody", "--so-pin-file", tmp_path / "so2.pin",
                      "--config", config2)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert f"{tmp_path / 'd' / 'softhsm' / 'tokens'}: owned by nobody" in made.stdout
    assert (tmp_path / "so2.pin").stat().st_uid == 0
    checked = as_nobody("config", "check", "--config", config2)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines()[-1] == "hsm login to 'line-1': the PIN logs in"

    missing = tmp_path / "d" / "e.toml"
    missing.write_text(config2.read_text().replace('softhsm_conf = "softhsm/softhsm2.conf"',
                                                   f'softhsm_conf = "{tmp_path / "nope.conf"}"'))  # fmt: skip
    missing.chmod(0o644)
    err = _one_line(as_nobody("config", "check", "--config", missing))
    assert f"hsm.softhsm_conf {tmp_path / 'nope.conf'}: no such file" in err


def test_a_refused_management_subject_records_nothing(commissioned: Path) -> None:
    """Review findings 6 and 7: the refusal named --subject, which `init` has not, and the organisation of the
    refused `init` was recorded for good."""
    refused = _one_line(_birthline("init", "--organisation", "Acme Devices", "--management-subject",
                                   "/O=Birthline-Demo/CN=Line Management CA", "--config", commissioned))  # fmt: skip
    assert refused.endswith("names are the demo's; give your organisation's (--management-subject)"), refused
    done = _birthline("init", "--organisation", "Other Devices", "--config", commissioned)
    assert done.returncode == 0, done.stderr
    assert "organisation 'Other Devices': the appliance's CAs are named after it" in done.stdout


def test_the_external_root_management_ca_in_the_readme_order(commissioned: Path, tmp_path: Path) -> None:
    """Review finding 7: after `init`, `ca request --name management` said only that the name exists. The
    documented order (docs/commissioning.md): a new name, import, [stations] management_ca, `init` again."""
    assert _birthline("init", "--organisation", "Acme Devices", "--config", commissioned).returncode == 0
    pw = "alice password 1\n"
    made = _birthline("user", "add", "alice", "--bootstrap", "--password-stdin", "--config", commissioned,
                      stdin=pw * 2)  # fmt: skip
    assert made.returncode == 0, made.stderr
    alice = ("--user", "alice", "--password-stdin", "--config", commissioned)
    subject = ("--role", "management", "--subject", "/O=Acme Devices/CN=Acme Appliance Management CA")
    taken = _one_line(_birthline("ca", "request", "--name", "management", *subject, "--out", tmp_path / "m.csr",
                                 *alice, stdin=pw))  # fmt: skip
    assert "request this one under a new name (--name NEW)" in taken and "[stations] management_ca" in taken
    asked = _birthline("ca", "request", "--name", "mgmt-acme", *subject, "--out", tmp_path / "m.csr", *alice,
                       stdin=pw)  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    root_key, root, ext = tmp_path / "root.key", tmp_path / "root.pem", tmp_path / "ext.cnf"
    for argv in (
        ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", root_key],
        ["req", "-x509", "-new", "-key", root_key, "-subj", "/O=Acme/CN=Acme Offline Root", "-days", "30", "-out",
         root, "-addext", "basicConstraints=critical,CA:TRUE,pathlen:1", "-addext",
         "keyUsage=critical,keyCertSign,cRLSign"],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True)
    ext.write_text("basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n")
    subprocess.run(["openssl", "x509", "-req", "-in", tmp_path / "m.csr", "-CA", root, "-CAkey", root_key,
                    "-CAcreateserial", "-days", "30", "-extfile", ext, "-out", tmp_path / "m.pem"],
                   check=True, capture_output=True)  # fmt: skip
    imported = _birthline("ca", "import", "--name", "mgmt-acme", "--cert", tmp_path / "m.pem", "--chain", root,
                          *alice, stdin=pw)  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    commissioned.write_text(commissioned.read_text() + '[stations]\nmanagement_ca = "mgmt-acme"\n')
    again = _birthline("init", "--config", commissioned)
    assert again.returncode == 0, again.stderr
    assert "management CA 'mgmt-acme': CN=Acme Appliance Management CA,O=Acme Devices" in again.stdout
    served = tmp_path / "state" / "tls" / "server.crt"
    issuer = subprocess.run(
        ["openssl", "x509", "-in", served, "-noout", "-issuer"], check=True, capture_output=True, text=True
    )
    assert "CN = Acme Appliance Management CA" in issuer.stdout, (issuer.stdout, again.stdout)


def test_an_init_that_fails_records_no_organisation(commissioned: Path, tmp_path: Path) -> None:
    """Review finding 7: the organisation of a failed `init` was recorded for good. Here `init` fails on a
    management CA still awaiting its certificate from the external root."""
    import sqlite3

    pw = "alice password 1\n"
    made = _birthline("user", "add", "alice", "--bootstrap", "--password-stdin", "--config", commissioned,
                      stdin=pw * 2)  # fmt: skip
    assert made.returncode == 0, made.stderr
    asked = _birthline("ca", "request", "--name", "management", "--role", "management", "--subject",
                       "/O=Acme Devices/CN=Acme Mgmt", "--out", tmp_path / "m.csr", "--user", "alice",
                       "--password-stdin", "--config", commissioned, stdin=pw)  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    failed = _one_line(_birthline("init", "--organisation", "Acme Devices", "--config", commissioned))
    assert "awaits its certificate from the external root" in failed
    with sqlite3.connect(tmp_path / "state" / "journal.sqlite") as db:
        assert db.execute("SELECT value FROM meta WHERE key='organisation'").fetchall() == []
