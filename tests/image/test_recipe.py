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
    assert [p.name for p in UNITS] == ["birthline-firstboot.service", "birthline-ready.service"]
    done = subprocess.run(
        ["systemd-analyze", "verify", *map(str, UNITS)], capture_output=True, text=True, check=False
    )
    problems = [x for x in (done.stdout + done.stderr).splitlines() if x.strip() and not NOISE.search(x)]
    assert problems == []


@pytest.mark.parametrize(
    ("shell", "script"),
    [
        ("sh", "image/rootfs/usr/lib/birthline/firstboot"),
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
