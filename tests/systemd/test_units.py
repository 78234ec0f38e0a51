"""The shipped systemd units, udev rules and their installer (systemd/, udev/): they pass `systemd-analyze verify`,
their hardening scores what docs/operations.md states, their command lines are ones `birthline` accepts, and
systemd/install.sh puts everything where the image expects it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.cli.main import build_parser

TOP = Path(__file__).resolve().parents[2]
UNITS = sorted((TOP / "systemd").glob("*.service"))
# The lines the acceptance check also ignores: the units name the appliance's /opt/birthline/bin/birthline,
# which does not exist on a development machine.
NOISE = re.compile(
    r"Failed to .*ExecStart|not executable|Cannot add dependency|is not executable|Command .* not found"
)

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def directives(path: Path) -> dict[str, list[str]]:
    """Key -> every value it is given (systemd allows a key many times), across sections."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(*paths: Path) -> list[str]:
    done = subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True, text=True,
                          check=False)  # fmt: skip
    return [
        line for line in (done.stdout + done.stderr).splitlines() if line.strip() and not NOISE.search(line)
    ]


def test_units_exist() -> None:
    assert [p.name for p in UNITS] == ["birthline-console.service", "birthline.service"]


def test_every_unit_verifies() -> None:
    assert verify(*UNITS) == []


def test_verify_still_sees_a_real_error(tmp_path: Path) -> None:
    """The noise filter hides only the missing executable: a misspelt directive and a bad value still fail."""
    broken = tmp_path / "birthline.service"
    text = (TOP / "systemd/birthline.service").read_text()
    broken.write_text(text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes").replace("WatchdogSec=30",
                                                                                       "WatchdogSec=thirty"))  # fmt: skip
    problems = verify(broken)
    assert any("NoNewPrivilege" in p for p in problems), problems
    line = text.splitlines().index("WatchdogSec=30") + 1
    assert any(f":{line}: Failed to parse sec value" in p for p in problems), problems


def test_daemon_unit_directives() -> None:
    d = directives(TOP / "systemd/birthline.service")
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"] and "StartLimitBurst" in d and "StartLimitIntervalSec" in d
    assert int(d["WatchdogSec"][0]) > 0
    assert "time-sync.target" in " ".join(d["After"]) and "time-sync.target" in " ".join(d["Wants"])
    assert d["User"] == ["birthline"] and d["StateDirectory"] == ["birthline"]
    assert d["ConfigurationDirectory"] == ["birthline"]
    assert d["ProtectSystem"] == ["strict"] and d["ReadWritePaths"] == ["/var/lib/birthline"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert d[key] == ["yes"], key
    assert d["SystemCallFilter"][0] == "@system-service"
    # The daemon chowns the control socket to [control] group: ~@privileged alone denies that (EPERM), which
    # stopped the daemon at its first boot under this unit.
    assert d["SystemCallFilter"][-1] == "@chown"
    assert d["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in d["DeviceAllow"]}
    assert {"char-ttyUSB", "char-ttyACM", "char-ttyS"} <= allowed
    assert "dialout" in d["SupplementaryGroups"][0].split()
    families = d["RestrictAddressFamilies"][0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    # The credential's name is the one [hsm] pin_credential names (docs/operations.md, docs/configuration.md).
    (cred,) = d["LoadCredential"]
    assert cred.split(":", 1)[0] == "hsm-pin"


def test_console_unit_directives() -> None:
    d = directives(TOP / "systemd/birthline-console.service")
    assert d["TTYPath"] == ["/dev/tty1"] and d["StandardInput"] == ["tty"]
    assert d["Conflicts"] == ["getty@tty1.service"] and d["Restart"] == ["always"]
    assert d["User"] == ["birthline-console"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX"]


def test_command_lines_are_ones_birthline_accepts() -> None:
    """ExecStart= of both units parses with birthline's own parser, so a renamed option cannot go unnoticed; the
    console's socket is in the daemon's RuntimeDirectory."""
    daemon = directives(TOP / "systemd/birthline.service")
    console = directives(TOP / "systemd/birthline-console.service")
    for d, command in ((daemon, "run"), (console, "dashboard")):
        argv = shlex.split(d["ExecStart"][0])
        assert argv[0] == "/opt/birthline/bin/birthline" and argv[1] == command
        build_parser(command).parse_args(argv[1:])
    socket = shlex.split(console["ExecStart"][0])[-1]
    assert Path(socket).parent == Path("/run") / daemon["RuntimeDirectory"][0]


@pytest.mark.parametrize("unit", ["birthline.service", "birthline-console.service"])
def test_exposure_is_what_the_docs_state(unit: str) -> None:
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(TOP / "systemd" / unit)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    m = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d)", done.stdout)
    assert m is not None, done.stdout[-500:] + done.stderr
    exposure = float(m.group(1))
    assert exposure <= 2.0
    stated = re.search(
        rf"`{re.escape(unit)}`[^\n]*exposure (\d+\.\d)", (TOP / "docs/operations.md").read_text()
    )
    assert stated is not None and float(stated.group(1)) == exposure


def test_install_into_an_image_root(tmp_path: Path) -> None:
    if shutil.which("systemd-sysusers") is None or shutil.which("systemctl") is None:
        pytest.skip("systemd-sysusers or systemctl not installed")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\ndialout:x:20:\n")
    subprocess.run(["sh", str(TOP / "systemd/install.sh"), "--root", str(root), "--enable"], check=True,
                   capture_output=True)  # fmt: skip
    for path in ("usr/lib/systemd/system/birthline.service", "usr/lib/systemd/system/birthline-console.service",
                 "usr/lib/sysusers.d/birthline.conf", "usr/lib/tmpfiles.d/birthline.conf",
                 "usr/lib/udev/rules.d/70-birthline-stations.rules", "usr/share/doc/birthline/operations.md"):  # fmt: skip
        assert (root / path).is_file(), path
    for unit in ("birthline.service", "birthline-console.service"):
        link = root / "etc/systemd/system/multi-user.target.wants" / unit
        assert link.is_symlink() and Path(link.readlink()).name == unit
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert {"birthline", "birthline-console"} <= set(users)
    groups = {
        line.split(":")[0]: line.split(":")[3].split(",")
        for line in (root / "etc/group").read_text().splitlines()
    }
    # The daemon reaches the serial ports and hands the control socket's directory to the console's group; the
    # console account is in no group but its own.
    assert "birthline" in groups["dialout"] and "birthline" in groups["birthline-console"]
    assert not any("birthline-console" in members for members in groups.values())
    assert (root / "etc/credstore").stat().st_mode & 0o777 == 0o700


def test_limit_nofile_covers_what_the_daemon_needs() -> None:
    """The daemon cannot raise its own descriptor limit (SystemCallFilter=~@resources refuses setrlimit), so the
    unit's LimitNOFILE= must already cover every listener's cap plus the reserve, as the daemon computes it at
    start ("file descriptors: limit N, needed M"), for the configuration first boot writes on the appliance and
    with the metrics listener on as well."""
    from appliance.config import parse_config
    from appliance.connections import fd_needed
    from appliance.daemon import fd_caps

    unit = directives(TOP / "systemd" / "birthline.service")
    assert "~@privileged @resources" in unit["SystemCallFilter"]
    limit = int(unit["LimitNOFILE"][-1])
    # The image's drop-in no longer overrides it: the unit itself is right.
    dropin = TOP / "image" / "rootfs" / "etc" / "systemd" / "system" / "birthline.service.d" / "50-image.conf"
    assert "LimitNOFILE" not in directives(dropin)
    hsm = {
        "module": "/usr/lib/softhsm/libsofthsm2.so",
        "token_label": "birthline",
        "pin_credential": "hsm-pin",
    }
    firstboot = {
        "appliance": {"state_dir": "/var/lib/birthline", "names": ["birthline.test"]},
        "hsm": hsm,
        "stations": {"lan_listen": "0.0.0.0:7450"},
        "va": {"listen": "0.0.0.0:7451"},
        # first boot also sets group = "birthline-console", a group of the image only: no effect on the caps.
        "control": {"socket": "/run/birthline/control.sock"},
    }
    line = {**firstboot, "va": {"listen": "0.0.0.0:7451", "ocsp_listen": "0.0.0.0:7452"}}
    for data in (firstboot, {**firstboot, "metrics": {"listen": "127.0.0.1:9100"}}, line):
        caps, fixed = fd_caps(parse_config(data, base_dir=TOP))
        # The OCSP line listener has caps of its own (the [va] values): counted once more when it is on.
        assert any("OCSP line listener" in name for name in fixed) == (data is line)
        assert "stations.max_connections" in caps and "va.max_connections" in caps
        needed = fd_needed(caps, fixed=fixed)
        assert needed <= limit, f"LimitNOFILE={limit} but the daemon needs {needed} ({caps}, {fixed})"
