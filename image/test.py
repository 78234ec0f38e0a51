"""`make image-test`: the appliance image, booted under qemu, enrols a device over a serial port and one over
the LAN, and keeps its journal and audit log across a power-down (docs/operations.md, "Building and testing
the image").

1. A fresh copy of build/image/system.img, a new state disk (image/mkstate.sh) carrying a provision/ directory
   (organisation, local root, the first administrator's password and a provision.sh that registers a serial and
   a LAN station, a line and a work order), and an empty 16 MiB "outbox" disk.
2. Boot 1: first boot makes the token and the hierarchy and runs provision.sh, which writes the two station
   bundles and the CA chain as a tar onto the outbox disk (raw, no filesystem: the host reads the file while
   the guest runs). Wait for `BIRTHLINE READY` on the serial console (ttyS0, logged to console-N.log).
3. Enrol IMG-0001 over the guest's ttyS1 (a second -serial, a TCP socket on 127.0.0.1 that the station client
   opens as socket://) and IMG-0002 over the LAN (user-mode networking, hostfwd from 127.0.0.1 only), with
   the project's station client; `openssl verify -x509_strict` both against the chain.
   Then, on ttyS0 (a Unix socket held from the start), a wrong root password gets "Login incorrect", root logs
   in with the password whose hash was provisioned, and `birthline report workorder` counts 2 issued.
4. Power down by ACPI (QMP system_powerdown); the state disk must then fsck clean.
5. Boot 2, on a fresh copy of system.img (as an upgrade replaces the system disk): READY again without first boot; the same request for IMG-0001 (same CSR) returns the stored
   certificate byte for byte, over the LAN this time. Power down.
   root logs in on the serial console again (the hash kept on the state disk).
6. The state copied out of the state disk with debugfs (no mount) passes `birthline audit verify` against the
   audit key exported at first boot, and `report workorder` counts both devices.

IMAGE_TEST_ROOT=external: before step 2, a boot 0 stops at `BIRTHLINE WAITING FOR ROOT` with the issuing CA's CSR
on the state disk; with the guest powered down the test signs it as an offline root would and writes the
certificate and the root back with debugfs; boot 1's first boot then imports them and carries on.

Every phase prints its duration. Software emulation (TCG); IMAGE_TEST_ACCEL=kvm uses KVM. IMAGE_TEST_WORK=DIR
works in DIR instead of build/image/test (two runs side by side).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.ports import free_ports  # noqa: E402

BUILD = Path(os.environ.get("BUILD", REPO / "build" / "image"))
WORK = Path(os.environ.get("IMAGE_TEST_WORK", BUILD / "test"))
BIRTHLINE = [sys.executable, "-m", "appliance.cli.main"]
# Test accounts of a throwaway appliance, typed into its provisioning.
ADMIN_PASSWORD = "alice image-test password"  # noqa: S105
# root's console login: only its hash (openssl passwd -6) goes onto the state disk.
ROOT_PASSWORD = "root image-test password"  # noqa: S105
SAM_PASSWORD = "sam image-test password"  # noqa: S105

# IMAGE_TEST_ROOT=external: the hierarchy under an offline root this test plays (the key ceremony's CSR out and
# certificate in through the state disk, with the guest powered down).
ROOT = os.environ.get("IMAGE_TEST_ROOT", "local")
FIRSTBOOT_CONF = f"""\
ORGANISATION="Image Test Devices"
NAMES="birthline.test"
ROOT={ROOT}
ADMIN=alice
"""

# Run by first boot as root, after the hierarchy: what a factory's own provisioning would do, plus handing the
# fixture bundles to this test on the outbox disk.
PROVISION_SH = f"""\
set -eu
bl() {{ /usr/local/sbin/birthline "$@" --config /etc/birthline/birthline.toml; }}
admin() {{ bl "$@" --user "$ADMIN" --password-stdin <"$ADMIN_PASSWORD_FILE"; }}
sam() {{ echo "{SAM_PASSWORD}" | bl "$@" --user sam --password-stdin; }}
{{ cat "$ADMIN_PASSWORD_FILE"; echo "{SAM_PASSWORD}"; }} | bl user add sam --role supervisor --user "$ADMIN" --password-stdin
admin tenant add acme
admin product add sensor --tenant acme --profile idevid
admin line add L1
admin station add --name st-serial --serial /dev/ttyS1 --out /var/lib/birthline/ceremony/st-serial
admin station add --name st-lan --lan --out /var/lib/birthline/ceremony/st-lan
sam line assign-station L1 st-serial
sam line assign-station L1 st-lan
sam workorder add WO-IMG --product sensor --quantity 10 --line L1 --range "IMG-[0001-0010]" --activate
tar -C /var/lib/birthline/ceremony -cf /dev/disk/by-id/virtio-outbox st-serial st-lan chain.pem audit.pem
sync
echo "provision.sh: bundles on the outbox disk"
"""


class Failed(Exception):
    pass


T0 = time.monotonic()


def phase(name: str, since: float) -> float:
    now = time.monotonic()
    print(f"image-test: {name}: {now - since:.1f} s (total {now - T0:.1f} s)", flush=True)
    return now


def run(
    argv: list[str], cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False, input=stdin)
    if out.returncode != 0:
        raise Failed(f"{' '.join(map(str, argv))}: exit {out.returncode}\n{out.stdout}{out.stderr}")
    return out


def accel() -> str:
    """Software emulation (TCG) unless IMAGE_TEST_ACCEL=kvm: on the machines this was written on /dev/kvm opens
    but a guest hangs after the kernel's "Probing EDD" (nested virtualisation)."""
    return "kvm" if os.environ.get("IMAGE_TEST_ACCEL", "") == "kvm" else "tcg"


def disk(name: str) -> list[str]:
    """A virtio disk whose serial the guest sees in /dev/disk/by-id/virtio-<name>."""
    return ["-drive", f"file={WORK / name}.img,format=raw,if=none,id={name}",
            "-device", f"virtio-blk-pci,drive={name},serial={name}"]  # fmt: skip


class Vm:
    def __init__(self, boot: int, lan_port: int, serial_port: int, accel: str) -> None:
        self.console = WORK / f"console-{boot}.log"
        self.qmp_path = WORK / f"qmp-{boot}.sock"
        # ttyS0 both ways: a Unix socket this test holds from the start (wait=on: qemu waits for it, so nothing
        # the guest writes is lost) and logs in through; everything the guest writes also goes to the log file.
        self.tty_path = WORK / f"ttyS0-{boot}.sock"
        for p in (self.console, self.qmp_path, self.tty_path):
            p.unlink(missing_ok=True)
        argv = [
            "qemu-system-x86_64", "-accel", accel, "-m", "1024", "-smp", "1", "-no-reboot",
            "-kernel", str(BUILD / "vmlinuz"), "-initrd", str(BUILD / "initrd.img"),
            # no_timer_check: a loaded host can make the kernel's timer check fail ("IO-APIC + timer doesn't work") and
            # panic under TCG; panic=-1 with -no-reboot makes a panic end qemu instead of hanging the test.
            "-append", "root=/dev/vda rw console=ttyS0 no_timer_check panic=-1",
            *disk("system"), *disk("state"), *disk("outbox"),
            "-display", "none", "-monitor", "none",
            "-chardev", f"socket,id=ttyS0,path={self.tty_path},server=on,wait=on",
            "-serial", "chardev:ttyS0",
            "-serial", f"tcp:127.0.0.1:{serial_port},server=on,wait=off",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{lan_port}-:7450",
            "-device", "virtio-net-pci,netdev=n0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        self.log = open(WORK / f"qemu-{boot}.log", "w")  # noqa: SIM115
        self._seen = b""  # ttyS0's output since the last expect() match
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.tty = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.tty.connect(str(self.tty_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise Failed(f"qemu did not open {self.tty_path}") from None
                time.sleep(0.2)
        threading.Thread(target=self._pump, name=f"ttyS0-{boot}", daemon=True).start()

    def _pump(self) -> None:
        """ttyS0's output into the console log (what wait_for reads) and the buffer expect() reads."""
        with open(self.console, "ab") as log:
            while chunk := self.tty.recv(4096):
                log.write(chunk)
                log.flush()
                with self._lock:
                    self._seen += chunk

    def text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first console line with one of the BIRTHLINE markers; fails on any but `pattern`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"^.*BIRTHLINE (READY|FAILED|NOT READY|WAITING FOR ROOT).*$", self.text(), re.M)
            if m:
                if not m.group(0).split("BIRTHLINE ", 1)[1].startswith(pattern):
                    raise Failed(f"console: {m.group(0)}\n{self.tail()}")
                return m.group(0)
            if self.proc.poll() is not None:
                raise Failed(f"qemu exited ({self.proc.returncode}) before {pattern}\n{self.tail()}")
            time.sleep(1)
        raise Failed(f"no BIRTHLINE {pattern} on the console in {timeout:.0f} s\n{self.tail()}")

    def send(self, line: str) -> None:
        """Type a line on ttyS0; expect() then looks only at what the guest writes from now on."""
        with self._lock:
            self._seen = b""
        self.tty.sendall(line.encode() + b"\r")

    def expect(self, pattern: bytes, timeout: float) -> re.Match[bytes]:
        """Wait until `pattern` appears in ttyS0's output after the last send() or match."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                m = re.search(pattern, self._seen)
                if m:
                    self._seen = self._seen[m.end() :]
                    return m
                seen = self._seen
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise Failed(
                    f"ttyS0: no {pattern!r} in {timeout:.0f} s; got:\n{seen[-3000:].decode(errors='replace')}"
                )
            time.sleep(0.5)

    def login(self, password: str, timeout: float, *, prompted: bool = False) -> None:
        """Log in as root on the serial console (ttyS0, serial-getty); `prompted`: the login prompt is already
        on the screen (an empty line would be taken as a user name)."""
        if not prompted:
            self.send("")  # a fresh prompt
            self.expect(rb"login: ", timeout)
        self.send("root")
        self.expect(rb"Password: ", timeout)
        self.send(password)
        self.expect(rb"root@birthline:[^\n]*# ", timeout)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def power_down(self, timeout: float) -> None:
        """ACPI power button through QMP; logind shuts the guest down and qemu exits with it."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(self.qmp_path))
            f = s.makefile("rw")
            f.readline()  # the greeting
            for cmd in ("qmp_capabilities", "system_powerdown"):
                f.write(json.dumps({"execute": cmd}) + "\n")
                f.flush()
                while "return" not in json.loads(f.readline()):
                    pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise Failed(f"the guest did not power down in {timeout:.0f} s\n{self.tail()}") from None
        self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def enrol(bundle: Path, serial: str, out: Path, csr: Path, where: list[str]) -> bytes:
    run([*BIRTHLINE, "station-client", "enroll", *where, "--credentials", str(bundle), "--serial", serial,
         "--csr", str(csr), "--out", str(out), "--timeout", "120"], cwd=REPO)  # fmt: skip
    return (out / f"{serial}.pem").read_bytes()


def verify(cert: Path, root: Path, issuing: Path) -> None:
    out = run(
        ["openssl", "verify", "-x509_strict", "-CAfile", str(root), "-untrusted", str(issuing), str(cert)]
    )
    if not out.stdout.strip().endswith("OK"):
        raise Failed(out.stdout)


def offline_root_signs() -> None:
    """The key ceremony with an external root: the CSR read off the powered-down state disk, signed by a root
    made here (as the organisation's offline root would), the certificate and the root's chain written back
    for the daemon's user; the next boot's first boot imports them."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ceremony = WORK / "ceremony"
    ceremony.mkdir()
    state = WORK / "state.img"
    run(["debugfs", "-R", f"dump /ceremony/issuing.csr {ceremony / 'issuing.csr'}", str(state)])
    csr = x509.load_pem_x509_csr((ceremony / "issuing.csr").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Image Test Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Image Test Offline Root"),
        ]
    )
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    forever = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)

    def ca_cert(
        subject: x509.Name, public: ec.EllipticCurvePublicKey, path_len: int | None
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(forever)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )

    root = ca_cert(name, key.public_key(), None)
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey), "the issuing CA's key is EC P-256 by default"
    issuing = ca_cert(csr.subject, public, 0)
    pem = serialization.Encoding.PEM
    (ceremony / "issuing.pem").write_bytes(issuing.public_bytes(pem))
    (ceremony / "root-chain.pem").write_bytes(root.public_bytes(pem))
    commands = ceremony / "debugfs.cmd"
    lines = ["cd /ceremony"]
    for f in ("issuing.pem", "root-chain.pem"):
        lines += [
            f"write {ceremony / f} {f}",
            f"sif /ceremony/{f} uid 990",
            f"sif /ceremony/{f} gid 990",
            f"sif /ceremony/{f} mode 0100600",
        ]
    commands.write_text("\n".join(lines) + "\n")
    run(["debugfs", "-w", "-f", str(commands), str(state)])
    back = run(["debugfs", "-R", "cat /ceremony/issuing.pem", str(state)]).stdout
    if back.encode() != issuing.public_bytes(pem):
        raise Failed("debugfs did not write issuing.pem onto the state disk")


def split_chain(chain: Path) -> tuple[Path, Path]:
    """ca chain writes the issuing CA first and the root last."""
    certs = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", chain.read_text(), re.S)
    if len(certs) != 2:
        raise Failed(f"{chain}: {len(certs)} certificates, expected issuing and root")
    issuing, root = chain.with_name("issuing.pem"), chain.with_name("root.pem")
    issuing.write_text(certs[0])
    root.write_text(certs[1])
    return root, issuing


def main() -> int:
    for f in ("system.img", "vmlinuz", "initrd.img"):
        if not (BUILD / f).exists():
            print(f"image-test: no {BUILD / f}: run make image first", file=sys.stderr)
            return 2
    mode = accel()
    print(f"image-test: qemu accelerator {mode}", flush=True)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    t = time.monotonic()

    provision = WORK / "provision"
    provision.mkdir()
    (provision / "firstboot.conf").write_text(FIRSTBOOT_CONF)
    (provision / "admin.password").write_text(ADMIN_PASSWORD + "\n")
    hashed = run(["openssl", "passwd", "-6", "-stdin"], stdin=ROOT_PASSWORD + "\n").stdout
    (provision / "root.passwd-hash").write_text(hashed)
    (provision / "provision.sh").write_text(PROVISION_SH)
    run(["cp", "--sparse=always", str(BUILD / "system.img"), str(WORK / "system.img")])
    run([str(REPO / "image" / "mkstate.sh"), str(WORK / "state.img"), str(provision)])
    with open(WORK / "outbox.img", "wb") as outbox:
        outbox.truncate(16 << 20)
    t = phase("disks ready (system copy, state disk with provision/, outbox)", t)

    lan_port = free_ports(2)
    serial_port = lan_port + 1
    # TCG on a loaded 2-core host: first boot has taken 6 to 12 minutes to READY.
    boot_timeout = 300 if mode == "kvm" else 2400
    if ROOT == "external":
        vm = Vm(0, lan_port, serial_port, mode)
        try:
            line = vm.wait_for("WAITING FOR ROOT", boot_timeout)
            t = phase(f"boot 0 (first boot: token, issuing CA request) to '{line.strip()}'", t)
            vm.power_down(180)
        finally:
            vm.kill()
        offline_root_signs()
        t = phase("the offline root signed issuing.csr; certificate and chain put on the state disk", t)
    vm = Vm(1, lan_port, serial_port, mode)
    try:
        line = vm.wait_for("READY", boot_timeout)
        t = phase(f"boot 1 (first boot: token, hierarchy, provisioning) to '{line.strip()}'", t)
        got = WORK / "got"
        with tarfile.open(WORK / "outbox.img") as tar:
            tar.extractall(got, filter="data")
        root, issuing = split_chain(got / "chain.pem")
        devices = WORK / "devices"
        devices.mkdir()
        csrs = {}
        for serial in ("IMG-0001", "IMG-0002"):
            run(
                [
                    "openssl",
                    "ecparam",
                    "-name",
                    "prime256v1",
                    "-genkey",
                    "-noout",
                    "-out",
                    str(devices / f"{serial}.key"),
                ]
            )
            csrs[serial] = devices / f"{serial}.csr"
            run(["openssl", "req", "-new", "-key", str(devices / f"{serial}.key"), "-subj", f"/serialNumber={serial}/CN={serial}",
                 "-out", str(csrs[serial])])  # fmt: skip
        serial_cert = enrol(got / "st-serial", "IMG-0001", devices, csrs["IMG-0001"],
                            ["--port", f"socket://127.0.0.1:{serial_port}"])  # fmt: skip
        t = phase("IMG-0001 enrolled over the serial port (guest ttyS1)", t)
        enrol(got / "st-lan", "IMG-0002", devices, csrs["IMG-0002"], ["--host", f"127.0.0.1:{lan_port}"])
        t = phase("IMG-0002 enrolled over the LAN (TLS, hostfwd 127.0.0.1)", t)
        for serial in ("IMG-0001", "IMG-0002"):
            verify(devices / f"{serial}.pem", root, issuing)
        print(
            "image-test: both certificates verify (openssl verify -x509_strict) against the chain", flush=True
        )
        t = administrator_login(vm, t)
        vm.power_down(180)
        t = phase("power down 1 (ACPI)", t)
    finally:
        vm.kill()
    run(["e2fsck", "-fn", str(WORK / "state.img")])
    print("image-test: the state disk is clean (e2fsck -fn)", flush=True)

    # A new system disk, as an upgrade installs one: whatever the first boot left on the old one is gone, and
    # only the state disk carries over.
    run(["cp", "--sparse=always", str(BUILD / "system.img"), str(WORK / "system.img")])
    vm = Vm(2, lan_port, serial_port, mode)
    try:
        vm.wait_for("READY", boot_timeout)
        if "birthline-firstboot: done" in vm.text():
            raise Failed("first boot ran again on the second boot")
        t = phase("boot 2 to READY (first boot skipped)", t)
        again = WORK / "again"
        again.mkdir()
        # The same request again, over the LAN: the journal answers with the certificate it stored.
        if (
            enrol(got / "st-lan", "IMG-0001", again, csrs["IMG-0001"], ["--host", f"127.0.0.1:{lan_port}"])
            != serial_cert
        ):
            raise Failed("IMG-0001 asked again after the reboot: not the stored certificate")
        t = phase("IMG-0001 asked again after the reboot: the stored certificate, byte for byte", t)
        # The new system disk's /etc/shadow has root locked: the login comes from the state disk's copy.
        vm.login(ROOT_PASSWORD, 300)
        vm.send("exit")
        t = phase("ttyS0: root logged in on the new system disk (the hash kept on the state disk)", t)
        vm.power_down(180)
        t = phase("power down 2 (ACPI)", t)
    finally:
        vm.kill()

    return check_state(t, got)


def administrator_login(vm: Vm, t: float) -> float:
    """The administrator's way in: a wrong password refused, then root's provisioned password on the serial
    console, and one administrator command through the `birthline` wrapper."""
    vm.send("")
    vm.expect(rb"login: ", 300)
    vm.send("root")
    vm.expect(rb"Password: ", 300)
    vm.send("not the password")
    vm.expect(rb"Login incorrect", 300)
    vm.expect(rb"login: ", 300)  # login asks again
    t = phase("ttyS0: a wrong root password is refused (Login incorrect)", t)
    vm.login(ROOT_PASSWORD, 300, prompted=True)
    t = phase("ttyS0: root logged in with the password provisioned as root.passwd-hash", t)
    # The markers are computed by the shell and python, so the echoed command line never matches them.
    vm.send(
        "birthline report workorder WO-IMG --json --config /etc/birthline/birthline.toml"
        ' </dev/null >/root/wo.json; echo BL-RC=$?; python3 -c \'import json; d = json.load(open("/root/wo.json"));'
        ' print("BL-" + "COUNTS", d["issued"], d["confirmed"], d["consistent"])\''
    )
    rc = vm.expect(rb"BL-RC=(\d+)", 600)
    if rc.group(1) != b"0":
        raise Failed(f"birthline report workorder on the appliance: exit {rc.group(1).decode()}")
    counts = vm.expect(rb"BL-COUNTS (\d+) (\d+) (True|False)", 120)
    print(f"image-test: on the appliance, birthline report workorder WO-IMG: issued {counts.group(1).decode()},"
          f" confirmed {counts.group(2).decode()}, consistent {counts.group(3).decode()}", flush=True)  # fmt: skip
    if counts.group(1) != b"2":
        raise Failed(f"report workorder on the appliance: issued {counts.group(1).decode()}, expected 2")
    vm.send("exit")
    return phase("ttyS0: birthline report workorder run by the administrator", t)


def check_state(t: float, got: Path) -> int:
    """The journal and audit log as the guest left them, read on this host from a copy of the state disk."""
    # Absolute: the configuration resolves relative paths from its own directory.
    state = (WORK / "state-copy").resolve()
    state.mkdir()
    run(["debugfs", "-R", f"rdump / {state}", str(WORK / "state.img")])
    t = phase("state copied out of the state disk (debugfs rdump, no mount)", t)
    # The guest's configuration, its paths moved to the copy; the PIN from the copy's root-only file.
    config = state / "host.toml"
    text = (state / "etc" / "birthline.toml").read_text().replace("/var/lib/birthline", str(state))
    text = text.replace('pin_credential = "hsm-pin"', f'pin_file = "{state}/etc/hsm.pin"')
    # The console's group exists in the image only; this host runs no daemon on the copy.
    config.write_text(text.replace('group = "birthline-console"', ""))
    softhsm = state / "softhsm" / "softhsm2.conf"
    softhsm.write_text(softhsm.read_text().replace("/var/lib/birthline", str(state)))
    out = run(
        [*BIRTHLINE, "audit", "verify", "--public-key", str(got / "audit.pem"), "--config", str(config)],
        cwd=REPO,
    )
    verdict = out.stdout.splitlines()[0] if out.stdout else ""
    if not verdict.endswith(": INTACT"):
        raise Failed(f"audit verify: {out.stdout}")
    print(f"image-test: audit verify --public-key (pinned at first boot): {verdict}", flush=True)
    out = run([*BIRTHLINE, "report", "workorder", "WO-IMG", "--json", "--config", str(config)], cwd=REPO)
    report = json.loads(out.stdout)
    counts = {k: report.get(k) for k in ("issued", "confirmed", "consistent")}
    print(f"image-test: report workorder WO-IMG: {counts}", flush=True)
    if counts != {"issued": 2, "confirmed": 2, "consistent": True}:
        raise Failed(
            f"report workorder WO-IMG: {counts}, expected 2 issued and confirmed (IMG-0001, IMG-0002)"
        )
    phase("audit verify and report workorder on the copy", t)
    print("image-test: PASSED", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as exc:
        print(f"image-test: FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
