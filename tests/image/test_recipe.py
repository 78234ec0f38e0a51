"""The image recipe's pieces that run without booting anything (the boot itself is `make image-test`, too slow
for the suite): its units verify, its scripts parse, and image/mkstate.sh makes the state disk first boot
expects, with no loop device or mount."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
ROOTFS = TOP / "image" / "rootfs"
UNITS = sorted((ROOTFS / "etc" / "systemd" / "system").glob("*.service"))
# As tests/systemd: the units name programs of the image, which this machine does not have.
NOISE = re.compile(
    r"Failed to .*ExecStart|not executable|Cannot add dependency|is not executable|Command .* not found"
)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_image_units_verify() -> None:
    assert [p.name for p in UNITS] == [
        "birthline-firstboot.service",
        "birthline-login.service",
        "birthline-ready.service",
    ]
    done = subprocess.run(
        ["systemd-analyze", "verify", *map(str, UNITS)], capture_output=True, text=True, check=False
    )
    problems = [x for x in (done.stdout + done.stderr).splitlines() if x.strip() and not NOISE.search(x)]
    assert problems == []


@pytest.mark.parametrize(
    ("shell", "script"),
    [
        ("sh", "image/rootfs/usr/lib/birthline/firstboot"),
        ("sh", "image/rootfs/usr/lib/birthline/login"),
        ("sh", "image/rootfs/usr/local/sbin/birthline"),
        ("bash", "image/build.sh"),
        ("bash", "image/mkstate.sh"),
    ],
)
def test_scripts_parse_and_are_executable(shell: str, script: str) -> None:
    path = TOP / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run([shell, "-n", str(path)], check=True)


def test_ready_marker_script_compiles() -> None:
    source = (ROOTFS / "usr" / "lib" / "birthline" / "ready").read_text()
    compile(source, "ready", "exec")


def test_pin_never_on_a_command_line() -> None:
    """The wrapper and first boot hand the PIN to systemd as a credential file, never as an argument."""
    wrapper = (ROOTFS / "usr" / "local" / "sbin" / "birthline").read_text()
    assert "LoadCredential=hsm-pin:/etc/credstore/birthline-hsm-pin" in wrapper
    assert (
        "LoadCredential=hsm-pin:/etc/credstore/birthline-hsm-pin"
        in (TOP / "systemd" / "birthline.service").read_text()
    )
    firstboot = (ROOTFS / "usr" / "lib" / "birthline" / "firstboot").read_text()
    assert not re.search(r"\$\(cat [^)]*hsm\.pin", firstboot)


# Shaped like `openssl passwd -6` output (what an administrator puts in provision/root.passwd-hash); no login uses it.
HASH = "$6$Xq1b2c3d4e5f6g7h$" + "a" * 86


def _build_units() -> list[str]:
    """The units build.sh enables (its `units=` lines)."""
    text = (TOP / "image" / "build.sh").read_text()
    return " ".join(m.group(1) for m in re.finditer(r'^units="(?:\$units )?([^"]*)"$', text, re.M)).split()


def test_the_image_has_login_prompts_but_no_ssh() -> None:
    """The administrator's ways in: a getty on the serial console and on tty2 (tty1 is the operator dashboard),
    and root's password applied by birthline-login.service before any of them prompts; SSH not installed."""
    units = _build_units()
    for unit in ("serial-getty@ttyS0.service", "getty@tty2.service", "birthline-login.service"):
        assert unit in units
    assert "getty@tty1.service" not in units
    console = (TOP / "systemd" / "birthline-console.service").read_text()
    assert "Conflicts=getty@tty1.service" in console
    login = (ROOTFS / "etc" / "systemd" / "system" / "birthline-login.service").read_text()
    assert re.search(r"^Before=.*systemd-user-sessions\.service", login, re.M)
    assert "RequiresMountsFor=/var/lib/birthline" in login
    packages = re.search(r"^PACKAGES=(.*)$", (TOP / "image" / "build.sh").read_text(), re.M)
    assert packages is not None and "openssh" not in packages.group(1)


def _fake_root(tmp_path: Path) -> Path:
    """A directory standing in for the appliance's /: root locked, as debootstrap leaves it."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "shadow").write_text("root:*:20000:0:99999:7:::\n")
    (root / "etc" / "shadow").chmod(0o600)
    (root / "var" / "lib" / "birthline" / "etc").mkdir(parents=True)
    (root / "var" / "lib" / "birthline" / "provision").mkdir()
    return root


def _login(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BIRTHLINE_LOGIN_ROOT": str(root)}
    return subprocess.run([str(ROOTFS / "usr" / "lib" / "birthline" / "login")], env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chpasswd") is None, reason="needs root and chpasswd")
def test_login_applies_the_provisioned_hash(tmp_path: Path) -> None:
    """birthline-login.service's script moves provision/root.passwd-hash to etc/ (root, 0600) and puts it in
    root's /etc/shadow entry; run again (the next boot, or after an upgrade replaced /etc/shadow) it applies the
    kept copy."""
    root = _fake_root(tmp_path)
    state = root / "var" / "lib" / "birthline"
    (state / "provision" / "root.passwd-hash").write_text(HASH + "\n")
    done = _login(root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (root / "etc" / "shadow").read_text().startswith(f"root:{HASH}:")
    kept = state / "etc" / "root.passwd-hash"
    assert kept.read_text() == HASH + "\n"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert not (state / "provision" / "root.passwd-hash").exists()
    # An upgrade: a new system disk, root locked again; the state disk's copy logs root in again.
    (root / "etc" / "shadow").write_text("root:*:20000:0:99999:7:::\n")
    assert _login(root).returncode == 0
    assert (root / "etc" / "shadow").read_text().startswith(f"root:{HASH}:")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chpasswd") is None, reason="needs root and chpasswd")
@pytest.mark.parametrize("content", ["", "a clear-text password", "root:" + HASH])
def test_login_never_takes_a_clear_text_password(tmp_path: Path, content: str) -> None:
    """No hash: root stays locked (exit 0, said in the log); anything but a crypt hash: refused, root locked."""
    root = _fake_root(tmp_path)
    if content:
        (root / "var" / "lib" / "birthline" / "provision" / "root.passwd-hash").write_text(content + "\n")
    done = _login(root)
    assert done.returncode == (0 if not content else 1), done.stdout
    assert "root stays locked" in done.stdout if not content else "not a crypt hash" in done.stdout
    assert (root / "etc" / "shadow").read_text() == "root:*:20000:0:99999:7:::\n"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mke2fs") is None, reason="needs root and e2fsprogs")
@pytest.mark.parametrize("hash_file", [None, "a clear-text password\n"])
def test_mkstate_refuses_a_state_disk_nobody_can_log_in_to(tmp_path: Path, hash_file: str | None) -> None:
    provision = tmp_path / "provision"
    provision.mkdir()
    (provision / "firstboot.conf").write_text('ORGANISATION="Acme"\n')
    if hash_file is not None:
        (provision / "root.passwd-hash").write_text(hash_file)
    image = tmp_path / "state.img"
    done = subprocess.run([str(TOP / "image" / "mkstate.sh"), str(image), str(provision), "32M"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 1
    assert ("no PROVISION_DIR/root.passwd-hash" if hash_file is None else "not a crypt hash") in done.stderr
    assert not image.exists()
    # Said explicitly, it makes one (with a warning).
    if hash_file is None:
        env = {**os.environ, "MKSTATE_NO_LOGIN": "1"}
        done = subprocess.run([str(TOP / "image" / "mkstate.sh"), str(image), str(provision), "32M"], env=env,
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "WARNING: no provision/root.passwd-hash" in done.stderr
        assert image.exists()


def _debugfs(image: Path, request: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mke2fs") is None, reason="needs root and e2fsprogs")
def test_mkstate_makes_the_state_disk(tmp_path: Path) -> None:
    provision = tmp_path / "provision"
    provision.mkdir()
    (provision / "firstboot.conf").write_text('ORGANISATION="Acme"\n')
    (provision / "admin.password").write_text("secret\n")
    (provision / "root.passwd-hash").write_text(HASH + "\n")
    image = tmp_path / "state.img"
    subprocess.run([str(TOP / "image" / "mkstate.sh"), str(image), str(provision), "32M"], check=True,
                   capture_output=True)  # fmt: skip
    header = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^Filesystem volume name:\s+bl-state$", header, re.M)
    root = _debugfs(image, "stat /")
    assert re.search(r"User:\s+990\s+Group:\s+990", root)
    assert re.search(r"Mode:\s+0700", root)
    password = _debugfs(image, "stat /provision/admin.password")
    assert re.search(r"User:\s+0\s+Group:\s+0", password)
    assert re.search(r"Mode:\s+0600", password)
    assert _debugfs(image, "cat /provision/firstboot.conf") == 'ORGANISATION="Acme"\n'
    assert re.search(r"Mode:\s+0600", _debugfs(image, "stat /provision/root.passwd-hash"))
