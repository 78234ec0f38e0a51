"""Issuance alone, and issuance while peers without a challenge password flood the SCEP server, in the same run.

    python bench/scep_flood.py [--stations 20] [--devices 60] [--rounds 3] [--floods challenge,spread]
                               [--compare SRC]

A fresh appliance (SoftHSM2 token, root/issuing/management CAs, journal) runs as its own process (`birthline
run`) with the LAN station listener and the SCEP server on 127.0.0.1, one label (`bench`, acting as the first
LAN station). `--stations` simulated LAN fixtures (stations.simulator, in this process) each enrol and confirm
`--devices` devices, first alone, then while another process floods the SCEP server; phases alternate for
`--rounds` rounds so the machine's noise falls on both. Each flood is a separate daemon run:

- `challenge`: PKCSReq (RSA-2048, AES-256, SHA-256, correctly signed and enveloped for the RA) with a wrong
  challenge password, 8 connections from 127.0.0.2: each costs a signature verification, an RSA decryption in
  the HSM and an HSM signature on the FAILURE CertRep unless refused 503 first;
- `spread`: the same from 64 addresses (127.0.0.2-65), 2 connections each: the budget all peers share.

Beside each flood, a good client with a work-order challenge asks for one certificate (a PKCSReq for a new
device) every 0.2 s from 127.0.0.1. Printed per flood: the median devices/s alone and during the flood, their
ratio, the daemon's CPU, what the flood got (HTTP 200 = a FAILURE CertRep after the checks and the HSM work, 503
= refused before any work), what the good client got, and the daemon's log lines during the flood phases.

`--compare SRC` repeats every flood with the daemon run from another source tree (`git archive main | tar -x -C
SRC`), for a before/after in one run. The flood, the fixtures and the daemon share this machine's cores; figures
are ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AttributeOID, NameOID

from bench.cmp_flood import Phase, Result, _bounded_phase, _phase, _report, _start_daemon
from bench.ocsp_flood import _stop
from bench.stations import CONFIG, _free_port, _setup, _wait_listening
from stations.simulator import SimStation

FLOODS = ("challenge", "spread")
LABEL = "bench"
PATH = f"/scep/{LABEL}?operation=PKIOperation"


# -- the flood (a separate process: `scep_flood.py --flood KIND PORT RA_PEM CHALLENGE_FILE`) ---------------------
def _pkcs_req(ra: x509.Certificate, serial: str, challenge: str) -> tuple[bytes, rsa.RSAPrivateKey]:
    from appliance.scep import client
    from appliance.scep.oids import MessageType

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)]))
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
        .sign(key, hashes.SHA256())
    )
    body = client.request(MessageType.PKCS_REQ, csr.public_bytes(serialization.Encoding.DER), key=key, ra=ra,
                          signer=client.self_signed(key, "device"), transaction_id=os.urandom(8).hex())  # fmt: skip
    return body, key


async def _post(port: int, body: bytes, src: str, reader_writer: list[object]) -> tuple[str, bytes]:
    """One POST on the connection in reader_writer (opened from `src` if closed); (status, body)."""
    if not reader_writer:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
        reader_writer[:] = [r, w]
    r, w = reader_writer  # type: ignore[assignment]
    assert isinstance(r, asyncio.StreamReader) and isinstance(w, asyncio.StreamWriter)
    w.write(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-pki-message\r\n"
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


async def _flood(kind: str, port: int, ra: x509.Certificate, challenge: str) -> dict[str, object]:
    from appliance.scep import cms
    from appliance.scep.algorithms import LEGACY_RISKS, AlgorithmPolicy
    from appliance.scep.oids import PkiStatus

    bodies = [_pkcs_req(ra, f"FLOOD-{i:04d}", "not the challenge")[0] for i in range(8)]
    addresses = [f"127.0.0.{2 + i}" for i in range(64)] if kind == "spread" else ["127.0.0.2"]
    per_address = 2 if kind == "spread" else 8
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    counts: Counter[str] = Counter()
    good: Counter[str] = Counter()
    policy = AlgorithmPolicy(frozenset(LEGACY_RISKS))

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
            serial = f"SCEP-{os.getpid() & 0xFFFFFFFF:08x}-{n:06d}"
            body, _ = await asyncio.to_thread(_pkcs_req, ra, serial, challenge)
            try:
                status, data = await _post(port, body, "127.0.0.1", rw)
            except (OSError, asyncio.IncompleteReadError):
                good["connection error"] += 1
                rw.clear()
            else:
                if status != "200":
                    good[f"HTTP {status}"] += 1
                else:
                    reply = cms.read_signed(data, policy)
                    good["certificate" if reply.pki_status == PkiStatus.SUCCESS else "refused"] += 1
            await asyncio.sleep(0.2)

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(conn(src, i)) for src in addresses for i in range(per_address)]
    tasks.append(asyncio.create_task(good_client()))
    print("flooding", flush=True)
    await stop.wait()
    elapsed = time.perf_counter() - t0
    _, late = await asyncio.wait(tasks, timeout=10)
    for t in late:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"elapsed": elapsed, "counts": counts, "good": good, "cpu": time.process_time()}


# -- the run -----------------------------------------------------------------------------------------------------
async def _with_flood(kind: str, sims: list[SimStation], devices: int, prefix: str, pid: int, port: int,
                      base: Path) -> tuple[Phase, dict[str, object]]:  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--flood", kind, str(port), str(base / "tls" / "scep-ra.pem"),
        str(base / "challenge"), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    await proc.stdout.readline()  # "flooding": connections opening
    await asyncio.sleep(2.0)  # past the bursts, to the flood's steady state
    try:
        phase = await _bounded_phase(sims, devices, prefix, pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await proc.communicate()
    return phase, json.loads(out.decode().strip().splitlines()[-1])


async def _rounds(base: Path, sims: list[SimStation], lan: int, port: int, kind: str, src: Path | None,
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
        await _wait_listening(port, proc)
        await _phase(sims, max(2, devices // 5), f"{tag}W", proc.pid)
        for r in range(rounds):
            alone.append(await _phase(sims, devices, f"{tag}A{r}", proc.pid))
            before = len(log.read_bytes().splitlines())
            t0 = time.perf_counter()
            phase, got = await _with_flood(kind, sims, devices, f"{tag}F{r}", proc.pid, port, base)
            flood_s += time.perf_counter() - t0
            lines += log.read_text(errors="replace").splitlines()[before:]
            during.append(phase)
            floods.append(got)
    finally:
        _stop(proc)
    return Result(alone, during, floods, lines, flood_s)


async def run(args: argparse.Namespace) -> int:
    from appliance.audit.log import AuditLog
    from appliance.config import load_config
    from appliance.production.users import Role, User
    from appliance.runtime import open_core
    from appliance.scep import challenges
    from hsm.softhsm import create_softhsm_token

    floods = [f for f in args.floods.split(",") if f]
    for f in floods:
        if f not in FLOODS:
            raise SystemExit(f"unknown flood {f!r}; one of {', '.join(FLOODS)}")
    with tempfile.TemporaryDirectory(prefix="birthline-bench-scep-flood-") as tmp:
        base = Path(tmp)
        lan, port = _free_port(), _free_port()
        token = create_softhsm_token(base / "softhsm", label="bench")
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
        text += f'[scep]\nlisten = "127.0.0.1:{port}"\n[scep.labels.{LABEL}]\nstation = "{sims[0].name}"\n'
        (base / "birthline.toml").write_text(text)
        config = load_config(base / "birthline.toml")
        with open_core(config) as core:
            admin = User("bench-admin", Role.ADMINISTRATOR)
            _, secret = challenges.add(
                core.journal, AuditLog(core.journal), admin, LABEL, work_order="WO-BENCH"
            )
        (base / "challenge").write_text(secret)
        print(f"{args.stations} LAN stations x {args.devices} devices over TLS per phase, real daemon (`birthline"
              f" run`), {args.rounds} rounds per flood")  # fmt: skip
        trees: list[tuple[str, Path | None]] = [("this tree", None)]
        if args.compare:
            trees.append((str(args.compare), args.compare))
        failed = 0
        for kind in floods:
            for i, (tree, src) in enumerate(trees):
                res = await _rounds(base, sims, lan, port, kind, src, args.rounds, args.devices,
                                    f"{kind.upper()}{i}")  # fmt: skip
                _report(f"flood {kind}, daemon from {tree}:", res)
                failed += sum(p.failures for p in [*res.alone, *res.during])
    return 1 if failed else 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--flood":
        _, _, kind, port, ra_pem, challenge_file = sys.argv
        ra = x509.load_pem_x509_certificate(Path(ra_pem).read_bytes())
        result = asyncio.run(_flood(kind, int(port), ra, Path(challenge_file).read_text().strip()))
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
