"""Issuance alone, and issuance while peers without credentials flood the CMP server, in the same run.

    python bench/cmp_flood.py [--stations 20] [--devices 60] [--rounds 3] [--floods pbm100k,pbmcap,...]
                              [--compare SRC]

A fresh appliance (SoftHSM2 token, root/issuing/management CAs, journal) runs as its own process (`birthline
run`) with the LAN station listener and the CMP server on 127.0.0.1, one MAC label (`bench`, kid `bench`, as the
served demo's `demo`). `--stations` simulated LAN fixtures (stations.simulator, in this process) each enrol and
confirm `--devices` devices, first alone, then while another process floods the CMP server; phases alternate
for `--rounds` rounds so the machine's noise falls on both. Each flood is a separate daemon run:

- `pbm100k`: the security review's: p10cr with senderKID = the label's kid, PasswordBasedMac with 100,000
  iterations and a random MAC, 4 connections from 127.0.0.2;
- `pbmcap`: the same at 10,000 iterations, the most `[cmp] max_mac_iterations` accepts by default (the
  costliest MAC check a peer can still ask for);
- `kid`: an unknown senderKID (the cheap refusal), 8 connections from 127.0.0.2;
- `rsaexp`: signed by an RSA-3072 key with a 3,070-bit public exponent (its certificate in extraCerts),
  4 connections;
- `chain`: signed by a certificate whose issuer's name 12 more certificates in extraCerts share (all one key,
  each signing the others), 4 connections;
- `spread`: `pbmcap` from 64 addresses (127.0.0.2-65), 2 connections each: the budget all peers share.

Beside each flood, a good client with the label's secret asks for one certificate (p10cr, PBM 500 iterations as
`openssl cmp` sends) every 0.2 s from 127.0.0.1. Printed per flood: the median devices/s alone and during the
flood, their ratio, the daemon's CPU, what the flood got (HTTP 200 = a CMP error answer after its checks, 503 =
refused before any work), what the good client got, and the daemon's log lines during the flood phases.

`--compare SRC` repeats every flood with the daemon run from another source tree (`git archive main | tar -x -C
SRC`), for a before/after in one run. The flood, the fixtures and the daemon share this machine's cores (2 here,
and other work); figures are ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

from appliance.cmp import (
    AlgorithmIdentifier,
    BodyType,
    CertRepBody,
    MacProtector,
    P10crBody,
    PKIHeader,
    build_message,
    oids,
    parse_message,
    request_header,
)
from appliance.cmp.build import Protector
from appliance.cmp.protection import SignatureProtector, pbm_parameters
from bench.ocsp_flood import _cpu_s, _stop
from bench.ocsp_flood import _phase as _ocsp_phase
from bench.stations import CONFIG, _free_port, _setup, _wait_listening
from stations.simulator import SimStation

FLOODS = ("pbm100k", "pbmcap", "kid", "rsaexp", "chain", "spread")
PATH = "/.well-known/cmp/p/bench"


@dataclasses.dataclass
class Phase:
    rate: float  # devices/s
    failures: int
    daemon_cpu: float  # the daemon's CPU use during the phase, in cores
    stalled: bool = False  # not finished within PHASE_LIMIT_S: `rate` is an upper bound


async def _phase(sims: list[SimStation], devices: int, prefix: str, pid: int) -> Phase:
    p = await _ocsp_phase(sims, devices, prefix, pid)
    return Phase(p.rate, p.failures, p.daemon_cpu)


# -- the flood (a separate process: `cmp_flood.py --flood KIND PORT SECRET_FILE`) --------------------------------
def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _csr(serial: str) -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def _cert(subject: str, issuer: str, key: PublicKeyTypes, signer: CertificateIssuerPrivateKeyTypes,
          ca: bool) -> x509.Certificate:  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(key).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)  # type: ignore[arg-type]
            .sign(signer, hashes.SHA256()))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RandomMac:
    """PBM parameters in the header, random bytes as the MAC: what a peer without the secret sends."""

    kid: bytes
    iterations: int
    extra_certs: tuple[x509.Certificate, ...] = ()

    def prepare(self, header: PKIHeader) -> PKIHeader:
        alg = AlgorithmIdentifier(oids.PASSWORD_BASED_MAC, pbm_parameters(os.urandom(16), self.iterations))
        return dataclasses.replace(header, protection_alg=alg, sender_kid=self.kid)

    def protect(self, header: PKIHeader, protected_part: bytes) -> bytes:
        return os.urandom(32)


def _huge_exponent_key() -> rsa.RSAPrivateKey:
    """RSA-3072 with a 3,070-bit public exponent: each verification costs about 100 times one with 65537."""
    base = rsa.generate_private_key(65537, 3072).private_numbers()
    p, q = base.p, base.q
    phi = (p - 1) * (q - 1)
    rng = random.Random(1)
    while True:
        e = rng.getrandbits(3070) | (1 << 3069) | 1
        try:
            d = pow(e, -1, phi)
        except ValueError:
            continue
        numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                        rsa.RSAPublicNumbers(e, p * q))  # fmt: skip
        return numbers.private_key(unsafe_skip_rsa_key_validation=True)


def _messages(kind: str, count: int = 8) -> list[bytes]:
    """`count` distinct request bodies of this flood kind."""
    protector: Protector
    if kind in ("pbm100k", "pbmcap", "spread"):
        protector = RandomMac(b"bench", 100_000 if kind == "pbm100k" else 10_000)
    elif kind == "kid":
        protector = RandomMac(b"no-such-kid", 500)
    elif kind == "rsaexp":
        key = _huge_exponent_key()
        protector = SignatureProtector(key, _cert("Flood RSA", "Flood RSA", key.public_key(), key, False))
    elif kind == "chain":
        ca_key = ec.generate_private_key(ec.SECP256R1())
        same = tuple(_cert("Flood CA", "Flood CA", ca_key.public_key(), ca_key, True) for _ in range(12))
        leaf = ec.generate_private_key(ec.SECP256R1())
        signer = _cert("Flood signer", "Flood CA", leaf.public_key(), ca_key, False)
        protector = SignatureProtector(leaf, signer, same)
    else:
        raise SystemExit(f"unknown flood {kind}")
    out = []
    for _ in range(count):
        header = request_header(
            sender=x509.DirectoryName(_name("flood")), recipient=x509.DirectoryName(_name("x"))
        )
        csr = _csr("FLOOD-00000000-000000")
        out.append(build_message(header, BodyType.P10CR, P10crBody(csr), protection=protector).der)
    return out


def _good_request(secret: bytes, n: int) -> bytes:
    """A p10cr with the label's secret (PBM, 500 iterations as `openssl cmp` sends), for a new device."""
    serial = f"CMP-{os.getpid() & 0xFFFFFFFF:08x}-{n:06d}"
    csr = _csr(serial)
    header = request_header(sender=x509.DirectoryName(csr.subject), recipient=x509.DirectoryName(_name("x")),
                            implicit_confirm=True)  # fmt: skip
    protector = MacProtector(secret, b"bench", iterations=500)
    return build_message(header, BodyType.P10CR, P10crBody(csr), protection=protector).der


async def _post(port: int, body: bytes, src: str, reader_writer: list[object]) -> tuple[str, bytes]:
    """One POST on the connection in reader_writer (opened from `src` if closed); (status, body)."""
    if not reader_writer:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
        reader_writer[:] = [r, w]
    r, w = reader_writer  # type: ignore[assignment]
    assert isinstance(r, asyncio.StreamReader) and isinstance(w, asyncio.StreamWriter)
    w.write(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/pkixcmp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    await w.drain()
    line = await r.readline()
    if not line:
        raise ConnectionResetError("closed")
    status = line.split()[1].decode()
    headers = {}
    while (h := await r.readline()) not in (b"\r\n", b""):
        k, _, v = h.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    data = await r.readexactly(int(headers.get("content-length", "0")))
    if headers.get("connection", "").lower() == "close":
        w.close()
        reader_writer.clear()
    return status, data


async def _flood(kind: str, port: int, secret: bytes) -> dict[str, object]:
    bodies = _messages(kind)
    addresses = [f"127.0.0.{2 + i}" for i in range(64)] if kind == "spread" else ["127.0.0.2"]
    per_address = 2 if kind == "spread" else 8 if kind == "kid" else 4
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    counts: Counter[str] = Counter()
    good: Counter[str] = Counter()

    async def conn(src: str, i: int) -> None:
        rw: list[object] = []
        while not stop.is_set():
            try:
                status, _ = await _post(port, bodies[i % len(bodies)], src, rw)
                counts[status] += 1
            except (OSError, asyncio.IncompleteReadError):
                counts["connection error"] += 1
                rw.clear()
                await asyncio.sleep(0.05)

    async def good_client() -> None:
        rw: list[object] = []
        n = 0
        while not stop.is_set():
            n += 1
            try:
                status, data = await _post(port, _good_request(secret, n), "127.0.0.1", rw)
            except (OSError, asyncio.IncompleteReadError):
                good["connection error"] += 1
                rw.clear()
            else:
                if status != "200":
                    good[f"HTTP {status}"] += 1
                else:
                    msg = parse_message(data)
                    body = msg.body
                    ok = isinstance(body, CertRepBody) and body.responses[0].certificate is not None
                    good["certificate" if ok else "refused"] += 1
            await asyncio.sleep(0.2)

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(conn(src, i)) for src in addresses for i in range(per_address)]
    tasks.append(asyncio.create_task(good_client()))
    print("flooding", flush=True)
    await stop.wait()
    elapsed = time.perf_counter() - t0
    # Each connection finishes the exchange it is in (one held by the pacing takes up to pace_max_delay_s), so
    # the daemon's log shows the flood, not connections cut mid-request.
    _, late = await asyncio.wait(tasks, timeout=10)
    for t in late:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"elapsed": elapsed, "counts": counts, "good": good, "cpu": time.process_time()}


def _pbm_costs(rounds: int = 10_000, repeat: int = 30) -> None:
    """What one PBM derivation costs the daemon: libcrypto (the GIL released) against the Python loop."""
    from appliance.cmp import _der, _pbm

    native = _pbm.native()
    salt, secret, data = os.urandom(16), b"bench secret", os.urandom(300)
    params = _der.sequence(_der.octet_string(salt), _der.algorithm_identifier(oids.SHA256), _der.integer(rounds),
                           _der.algorithm_identifier(oids.HMAC_WITH_SHA256))  # fmt: skip

    def median_ms(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)

    py = median_ms(lambda: _pbm.python_pbm_key("sha256", secret, salt, rounds))
    if native is None:
        print(f"PBM key, {rounds:,} SHA-256 rounds: Python {py:.2f} ms (GIL held); libcrypto not usable here")
        return
    c = median_ms(lambda: native(params, secret, data))
    print(f"PBM key, {rounds:,} SHA-256 rounds (median of {repeat}): libcrypto {c:.2f} ms (GIL released),"
          f" Python {py:.2f} ms (GIL held): {py / c:.1f}x")  # fmt: skip


# -- the run -----------------------------------------------------------------------------------------------------
def _start_daemon(config_path: Path, log: Path, src: Path | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(config_path)],
            stdout=out, stderr=subprocess.STDOUT, cwd=src, env=env,
        )  # fmt: skip


PHASE_LIMIT_S = 120.0


async def _bounded_phase(sims: list[SimStation], devices: int, prefix: str, pid: int) -> Phase:
    """A phase during a flood, given up after PHASE_LIMIT_S (a flood that stalls the daemon would never let it
    end): then its rate is reported as at most what finishing right then would have been."""
    cpu0, t0 = _cpu_s(pid), time.perf_counter()
    try:
        return await asyncio.wait_for(_phase(sims, devices, prefix, pid), PHASE_LIMIT_S)
    except TimeoutError:
        cpu = (_cpu_s(pid) - cpu0) / (time.perf_counter() - t0)
        return Phase(len(sims) * devices / PHASE_LIMIT_S, 0, cpu, stalled=True)


async def _with_flood(
    kind: str, sims: list[SimStation], devices: int, prefix: str, pid: int, port: int, secret_file: Path
) -> tuple[Phase, dict[str, object]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--flood", kind, str(port), str(secret_file), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    await proc.stdout.readline()  # "flooding": connections opening
    await asyncio.sleep(2.0)  # past the bursts, to the flood's steady state
    try:
        phase = await _bounded_phase(sims, devices, prefix, pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await proc.communicate()
    return phase, json.loads(out.decode().strip().splitlines()[-1])


@dataclasses.dataclass
class Result:
    alone: list[Phase]
    during: list[Phase]
    floods: list[dict[str, object]]
    log_lines: list[str]  # daemon log lines written during the flood phases
    flood_s: float


async def _rounds(base: Path, sims: list[SimStation], lan: int, cmp_port: int, kind: str, src: Path | None,
                  rounds: int, devices: int, tag: str) -> Result:  # fmt: skip
    log = base / f"daemon-{tag}.log"
    proc = _start_daemon(base / "birthline.toml", log, src)
    alone: list[Phase] = []
    during: list[Phase] = []
    floods: list[dict[str, object]] = []
    lines: list[str] = []
    flood_s = 0.0
    try:
        await _wait_listening(lan, proc)
        await _wait_listening(cmp_port, proc)
        await _phase(sims, max(2, devices // 5), f"{tag}W", proc.pid)
        for r in range(rounds):
            alone.append(await _phase(sims, devices, f"{tag}A{r}", proc.pid))
            before = len(log.read_bytes().splitlines())
            t0 = time.perf_counter()
            phase, got = await _with_flood(kind, sims, devices, f"{tag}F{r}", proc.pid, cmp_port,
                                           base / "cmp.secret")  # fmt: skip
            flood_s += time.perf_counter() - t0
            lines += log.read_text(errors="replace").splitlines()[before:]
            during.append(phase)
            floods.append(got)
    finally:
        _stop(proc)
    return Result(alone, during, floods, lines, flood_s)


def _describe(counts: dict[str, int], elapsed: float) -> str:
    total = sum(counts.values())
    parts = ", ".join(f"{k} {v / elapsed:,.1f}/s" for k, v in sorted(counts.items()))
    return f"{total / elapsed:,.1f}/s ({parts})" if total else "nothing"


def _report(title: str, res: Result) -> None:
    a = statistics.median(p.rate for p in res.alone)
    d = statistics.median(p.rate for p in res.during)
    ca = statistics.median(p.daemon_cpu for p in res.alone)
    cd = statistics.median(p.daemon_cpu for p in res.during)
    print(title)
    print(f"    issuance alone:            median {a:7.1f} devices/s  (rounds: "
          f"{', '.join(f'{p.rate:.0f}' for p in res.alone)})")  # fmt: skip
    print(f"    issuance during the flood: median {d:7.1f} devices/s  (rounds: "
          f"{', '.join(('<' if p.stalled else '') + f'{p.rate:.0f}' for p in res.during)})")  # fmt: skip
    if any(p.stalled for p in res.during):
        print(f"    ('<': the phase had not finished after {PHASE_LIMIT_S:.0f} s and was given up)")
    print(f"    during / alone:            {d / a:7.0%}  (per round: "
          f"{', '.join(f'{y.rate / x.rate:.0%}' for x, y in zip(res.alone, res.during, strict=True))})")  # fmt: skip
    last = res.floods[-1]
    elapsed = float(str(last["elapsed"]))
    print(f"    daemon CPU (cores):        alone {ca:.2f}, during the flood {cd:.2f}; the flood's own process"
          f" {float(str(last['cpu'])) / elapsed:.2f} (last round)")  # fmt: skip
    print(f"    the flood got (last round): {_describe(last['counts'], elapsed)}")  # type: ignore[arg-type]
    print(f"    the good client got:        {_describe(last['good'], elapsed)}")  # type: ignore[arg-type]
    print(f"    daemon log lines during the floods: {len(res.log_lines)} in {res.flood_s:.0f} s", end="")
    kinds = Counter(
        line[:90] for line in res.log_lines if line[:1].isupper() and not line.startswith("Traceback")
    )
    print("".join(f"\n        {n:5d} x {text}" for text, n in kinds.most_common(4)))
    failed = sum(p.failures for p in [*res.alone, *res.during])
    if failed:
        print(f"    {failed} enrolments failed")


async def run(args: argparse.Namespace) -> int:
    from appliance import ca as ca_mod
    from appliance.config import load_config
    from appliance.runtime import open_core
    from hsm.softhsm import create_softhsm_token

    floods = [f for f in args.floods.split(",") if f]
    for f in floods:
        if f not in FLOODS:
            raise SystemExit(f"unknown flood {f!r}; one of {', '.join(FLOODS)}")
    with tempfile.TemporaryDirectory(prefix="birthline-bench-cmp-") as tmp:
        base = Path(tmp)
        lan, cmp_port = _free_port(), _free_port()
        token = create_softhsm_token(base / "softhsm", label="bench")
        secret = base / "cmp.secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, os.urandom(16).hex().encode() + b"\n")
        os.close(fd)
        text = CONFIG.format(base=base, module=token.module, label=token.label, pin=token.pin_file,
                             conf=token.conf_path, port=lan)  # fmt: skip
        text = text.replace('[va]\nlisten = "127.0.0.1:0"\n', '[va]\nlisten = ""\n')
        # every simulated station connects from 127.0.0.1: allow them all (the default per address is 16)
        text = text.replace(
            "reopen_interval_s = 0.1\n", "reopen_interval_s = 0.1\nmax_connections_per_peer = 64\n"
        )
        (base / "birthline.toml").write_text(text)
        config = load_config(base / "birthline.toml")
        sims = [
            dataclasses.replace(s, host="127.0.0.1", tcp_port=lan)
            for s in _setup(config, base, 0, args.stations)
        ]
        with open_core(config) as core:
            root = ca_mod.load_ca(core.journal, "root").certificate
        assert root is not None
        (base / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
        # The label takes MAC (the demo's `demo`) and birth certificates of the root (the demo's `field`): a
        # signer's chain is then looked for in extraCerts.
        text += (f'[cmp]\nlisten = "127.0.0.1:{cmp_port}"\n[cmp.labels.bench]\nstation = "lan00"\n'
                 f'secret_file = "{secret}"\nidevid_roots = "{base / "root.pem"}"\n')  # fmt: skip
        (base / "birthline.toml").write_text(text)
        print(f"{args.stations} LAN stations x {args.devices} devices over TLS per phase, real daemon (`birthline"
              f" run`), {args.rounds} rounds per flood")  # fmt: skip
        _pbm_costs()
        trees: list[tuple[str, Path | None]] = [("this tree", None)]
        if args.compare:
            trees.append((str(args.compare), args.compare))
        failed = 0
        for kind in floods:
            for i, (tree, src) in enumerate(trees):
                res = await _rounds(base, sims, lan, cmp_port, kind, src, args.rounds, args.devices,
                                    f"{kind.upper()}{i}")  # fmt: skip
                _report(f"flood {kind}, daemon from {tree}:", res)
                failed += sum(p.failures for p in [*res.alone, *res.during])
    return 1 if failed else 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--flood":
        _, _, kind, port, secret_file = sys.argv
        result = asyncio.run(_flood(kind, int(port), Path(secret_file).read_bytes().strip()))
        print(json.dumps(result), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--stations", type=int, default=20)
    ap.add_argument("--devices", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--floods", default=",".join(FLOODS))
    ap.add_argument(
        "--compare", type=Path, help="also run the daemon from this source tree (e.g. an export of main)"
    )
    args = ap.parse_args()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
