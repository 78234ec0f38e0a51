"""Soak and overload against the real daemon: stations on the LAN with OCSP and CMP traffic beside them.

    python bench/soak.py [--minutes 30] [--overload-minutes 2] [--stations 20] [--capacity-s 30]
                         [--ocsp-rate 20] [--cmp-rate 2] [--sample-s 10] [--max-queued STATIONS+4]

A fresh appliance (SoftHSM2 token, root/issuing/management CAs, a work order, journal) runs as its own process
(`birthline run`) with the LAN station listener, the VA (OCSP) and the CMP server (one MAC label) on 127.0.0.1;
the simulated stations, the OCSP and the CMP clients run in this process. Four phases, one daemon run:

1. capacity: `--stations` stations enrol and confirm devices back to back for `--capacity-s` seconds: C
   certificates/s, and the rate one station reached (C / stations). The daemon's CPU is printed beside each
   phase (a share of one core, main process and prepare workers): near its ceiling here, C is the appliance's
   capacity on this machine, not the clients'.
2. soak: the same stations, each on a fixed schedule so that together they ask for C/2 devices a second, for
   `--minutes`, with an OCSP client (`--ocsp-rate` POST /ocsp a second, each for a certificate issued earlier
   in the run, with a nonce) and a CMP client (`--cmp-rate` p10cr a second, MAC-protected, implicit confirm)
   beside them. The daemon's RSS (main process and its prepare workers, from /proc) is sampled every
   `--sample-s`. Errors (a station giving up or refused, an OCSP answer other than "good", a CMP answer other than
   a certificate) must be 0.
3. overload: twice the stations, each on the schedule of a station at capacity (offered: 2C/s, twice the
   requests in flight at once) for `--overload-minutes`, with the OCSP and CMP clients. The daemon runs with
   `[issuance] max_queued = --max-queued`: past it a request is shed, a station answered PENDING with a
   retry-after (it waits and sends the same ENROLL again), a CMP client systemUnavail; the VA answers OCSP
   tryLater when a signature could not start within its sign_wait_s, the HSM thread busy with certificates
   (docs/revocation.md). Printed: the PENDING answers, the latency of the requests accepted (ENROLL sent to
   CERT received, for the attempt that got the certificate) and of devices end to end, and errors (0 expected:
   a shed request is retried, never lost).
4. checks, daemon stopped: PRAGMA integrity_check ok; no certificate serial twice; no intent left; quota of the
   work order equals its live rows; the audit chain verifies; every certificate a station or the CMP client
   received is in the journal with the same bytes.

Exit status 1 if any check failed or any phase had an error. The clients share this machine's cores with the
daemon (2 here, and other work): C is measured in the same run, and the soak's load is relative to it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from bench.cmp_flood import PATH as CMP_PATH
from bench.cmp_flood import _good_request
from bench.ocsp_flood import _issuer_hashes, _request
from bench.stations import CONFIG, _free_port, _setup, _wait_listening
from stations.client import StationClient, generate_device_key, make_csr
from stations.errors import StationError
from stations.messages import Cert, Message
from stations.simulator import SimStation


@dataclass
class Tally:
    ok: int = 0
    latencies: list[float] = field(default_factory=list)  # per device: enrol + confirm, end to end
    accepted: list[float] = field(default_factory=list)  # per accepted ENROLL: sent -> CERT
    errors: Counter[str] = field(default_factory=Counter)
    pending: int = 0  # PENDING answers (shed requests)
    ocsp_ok: int = 0
    ocsp_shed: int = 0  # tryLater, in the overload phase
    cmp_ok: int = 0
    cmp_refused: Counter[str] = field(default_factory=Counter)
    cpu: float = 0.0  # the daemon's CPU during the phase, in cores


@dataclass
class Run:
    base: Path
    sims: list[SimStation]
    va_port: int
    cmp_port: int
    secret: bytes
    hashes: tuple[bytes, bytes]
    received: dict[str, bytes] = field(default_factory=dict)  # device serial -> certificate DER
    serials: list[int] = field(default_factory=list)  # issued certificate serials, for OCSP
    cmp_n: int = 0  # CMP devices asked for so far (their serials: CMP-<pid>-<n>)
    pid: int = 0  # the daemon's


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def _station(
    run: Run, sim: SimStation, interval: float | None, until: float, tally: Tally, tag: str
) -> None:
    """One station: a device every `interval` seconds on a fixed schedule (None: back to back) until `until`."""
    try:
        client = await StationClient.connect_tcp(
            sim.host or "127.0.0.1", sim.tcp_port or 0, station_id=sim.name, key=sim.key,
            ssl_context=sim.ssl_context, server_hostname=sim.server_hostname, give_up_after=120,
        )  # fmt: skip
    except StationError as exc:
        tally.errors[f"connect:{exc.code.name}"] += 1
        return
    exchange = client._exchange

    async def timed(message: Message, request_id: bytes, wanted: tuple[type[Message], ...]) -> Message:
        start = time.perf_counter()
        reply = await exchange(message, request_id, wanted)
        if isinstance(reply, Cert):
            tally.accepted.append(time.perf_counter() - start)
        return reply

    setattr(client, "_exchange", timed)  # noqa: B010 - the bench times the accepted exchange, not the retries
    due, n = time.monotonic(), 0
    try:
        while time.monotonic() < until:
            if interval is not None:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                due += interval
            serial = f"{tag}{sim.name.upper()}-{os.getpid():08x}-{n:06d}"
            n += 1
            csr = make_csr(generate_device_key(), serial)
            start = time.perf_counter()
            try:
                chain = await client.enroll(serial, csr)
                rid = client.last_request_id
                assert rid is not None
                run.received[serial] = chain[0]
                await client.confirm(rid, chain[0])
            except StationError as exc:
                tally.errors[f"station:{exc.code.name}"] += 1
                continue
            tally.latencies.append(time.perf_counter() - start)
            tally.ok += 1
            run.serials.append(x509.load_der_x509_certificate(chain[0]).serial_number)
    finally:
        tally.pending += client.stats.pending
        await client.close()


async def _http(port: int, path: str, ctype: str, body: bytes, conn: list[object]) -> tuple[int, bytes]:
    if not conn:
        conn[:] = await asyncio.open_connection("127.0.0.1", port)
    r, w = conn
    assert isinstance(r, asyncio.StreamReader) and isinstance(w, asyncio.StreamWriter)
    w.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)  # fmt: skip
    await w.drain()
    line = await r.readline()
    if not line:
        conn.clear()
        raise ConnectionResetError("closed")
    status = int(line.split()[1])
    headers = {}
    while (h := await r.readline()) not in (b"\r\n", b""):
        k, _, v = h.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    data = await r.readexactly(int(headers.get("content-length", "0")))
    if headers.get("connection", "").lower() == "close":
        w.close()
        conn.clear()
    return status, data


async def _ocsp_client(run: Run, rate: float, until: float, tally: Tally, shed_ok: bool) -> None:
    conn: list[object] = []
    rng = random.Random(1)
    due = time.monotonic()
    while time.monotonic() < until:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        due += 1 / rate
        if not run.serials:
            continue
        serial = rng.choice(run.serials)
        try:
            status, data = await _http(run.va_port, "/ocsp", "application/ocsp-request",
                                       _request(*run.hashes, serial), conn)  # fmt: skip
        except (OSError, asyncio.IncompleteReadError) as exc:
            tally.errors[f"ocsp:{type(exc).__name__}"] += 1
            continue
        if status != 200:
            tally.errors[f"ocsp:http-{status}"] += 1
            continue
        answer = ocsp.load_der_ocsp_response(data)
        if answer.response_status is ocsp.OCSPResponseStatus.TRY_LATER and shed_ok:
            tally.ocsp_shed += 1  # the HSM thread busy with certificates: the VA sheds (docs/revocation.md)
        elif answer.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            tally.errors[f"ocsp:{answer.response_status.name}"] += 1
        elif answer.certificate_status is not ocsp.OCSPCertStatus.GOOD or answer.serial_number != serial:
            tally.errors[f"ocsp:{answer.certificate_status.name}"] += 1
        else:
            tally.ocsp_ok += 1


async def _cmp_client(run: Run, rate: float, until: float, tally: Tally, shed_ok: bool) -> None:
    from appliance.cmp import CertRepBody, ErrorBody, parse_message

    conn: list[object] = []
    due = time.monotonic()
    while time.monotonic() < until:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        due += 1 / rate
        run.cmp_n += 1
        body = _good_request(run.secret, run.cmp_n)
        try:
            status, data = await _http(run.cmp_port, CMP_PATH, "application/pkixcmp", body, conn)
        except (OSError, asyncio.IncompleteReadError) as exc:
            tally.errors[f"cmp:{type(exc).__name__}"] += 1
            continue
        if status == 503 and shed_ok:
            tally.cmp_refused["http-503"] += 1
            continue
        if status != 200:
            tally.errors[f"cmp:http-{status}"] += 1
            continue
        reply = parse_message(data)
        rep = reply.body
        if isinstance(rep, CertRepBody) and rep.responses and rep.responses[0].certificate is not None:
            cert = rep.responses[0].certificate
            subject = x509.load_der_x509_csr(_csr_of(body)).subject
            serial_attr = subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value
            run.received[str(serial_attr)] = cert.public_bytes(serialization.Encoding.DER)
            tally.cmp_ok += 1
            continue
        status_info = rep.responses[0].status if isinstance(rep, CertRepBody) and rep.responses else None
        if isinstance(rep, ErrorBody):
            status_info = rep.status
        infos = set() if status_info is None else {f.asn1_name for f in status_info.fail_info}
        what = "?" if status_info is None else f"{status_info.status.name}:{','.join(sorted(infos))}"
        if shed_ok and infos == {"systemUnavail"}:
            tally.cmp_refused["systemUnavail"] += 1
        else:
            tally.errors[f"cmp:{what}"] += 1


def _csr_of(message_der: bytes) -> bytes:
    from appliance.cmp import P10crBody, parse_message

    body = parse_message(message_der).body
    assert isinstance(body, P10crBody)
    return body.csr.public_bytes(serialization.Encoding.DER)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of the daemon and its children so far."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _rss_kib(pid: int) -> tuple[int, int]:
    """(main process, main + its children) VmRSS in KiB."""

    def rss(p: int) -> int:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    main = rss(pid)
    return main, main + sum(rss(p) for p in _children(pid))


async def _sampler(pid: int, every: float, until: float, samples: list[tuple[float, int, int]]) -> None:
    start = time.monotonic()
    while True:
        main, total = _rss_kib(pid)
        samples.append((time.monotonic() - start, main, total))
        if time.monotonic() >= until:
            return
        await asyncio.sleep(min(every, max(0.0, until - time.monotonic())))


async def _phase(run: Run, sims: list[SimStation], interval: float | None, seconds: float, tag: str,
                 ocsp_rate: float, cmp_rate: float, shed_ok: bool) -> tuple[Tally, float]:  # fmt: skip
    tally = Tally()
    cpu_before = cpu_s(run.pid)
    until = time.monotonic() + seconds
    start = time.perf_counter()
    jobs = [_station(run, s, interval, until, tally, tag) for s in sims]
    if ocsp_rate:
        jobs.append(_ocsp_client(run, ocsp_rate, until, tally, shed_ok))
    if cmp_rate:
        jobs.append(_cmp_client(run, cmp_rate, until, tally, shed_ok))
    await asyncio.gather(*jobs)
    elapsed = time.perf_counter() - start
    tally.cpu = (cpu_s(run.pid) - cpu_before) / elapsed
    return tally, elapsed


def _print_phase(name: str, tally: Tally, elapsed: float) -> None:
    lat = sorted(tally.latencies)
    acc = sorted(tally.accepted)
    print(f"  {name}: {tally.ok} devices in {elapsed:.0f} s = {tally.ok / elapsed:.1f}/s (daemon CPU"
          f" {tally.cpu:.0%} of a core); device p50"
          f" {statistics.median(lat) * 1000 if lat else 0:.0f} ms p99 {p99(lat) * 1000:.0f} ms max"
          f" {lat[-1] * 1000 if lat else 0:.0f} ms; accepted ENROLL p99 {p99(acc) * 1000:.0f} ms max"
          f" {acc[-1] * 1000 if acc else 0:.0f} ms; PENDING (shed) {tally.pending}; OCSP good {tally.ocsp_ok},"
          f" tryLater {tally.ocsp_shed};"
          f" CMP certificates {tally.cmp_ok}, CMP shed {dict(tally.cmp_refused)}; errors"
          f" {sum(tally.errors.values())} {dict(tally.errors)}")  # fmt: skip


def _checks(run: Run) -> list[str]:
    from appliance.audit.verify import verify as audit_verify
    from appliance.issuance.journal import Journal
    from appliance.production import reconcile

    problems = []
    with Journal(run.base / "state" / "journal.sqlite") as journal:
        if (ic := journal.integrity_check()) != "ok":
            problems.append(f"integrity_check: {ic}")
        rows = journal.rows()
        serials = [r.cert_serial for r in rows if r.cert_serial]
        if len(serials) != len(set(serials)):
            problems.append("a certificate serial appears twice")
        if intents := [r for r in rows if r.state == "intent"]:
            problems.append(f"{len(intents)} intents left")
        live = {r.device_serial: r for r in rows if r.state in ("issued", "confirmed")}
        missing = [s for s, der in run.received.items() if s not in live or live[s].cert_der != der]
        if missing:
            problems.append(f"{len(missing)} certificates received are not in the journal as sent")
        problems += [f"quota: {p}" for p in reconcile.quota_problems(journal)]
        report = audit_verify(journal)
        if not report.ok:
            problems.append(f"audit: {report.text()}")
        print(f"  journal: {len(rows)} rows, {len(live)} live, {len(run.received)} certificates received by"
              f" clients, all checked")  # fmt: skip
    return problems


async def main_async(args: argparse.Namespace) -> int:
    from appliance.config import load_config
    from appliance.runtime import open_core
    from hsm.softhsm import create_softhsm_token

    with tempfile.TemporaryDirectory(prefix="birthline-soak-") as tmp:
        base = Path(tmp)
        lan, va, cmp_port = _free_port(), _free_port(), _free_port()
        token = create_softhsm_token(base / "softhsm", label="bench")
        secret = os.urandom(16).hex().encode()
        fd = os.open(base / "cmp.secret", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, secret + b"\n")
        os.close(fd)
        text = CONFIG.format(base=base, module=token.module, label=token.label, pin=token.pin_file,
                             conf=token.conf_path, port=lan)  # fmt: skip
        text = text.replace('[va]\nlisten = "127.0.0.1:0"\n', f'[va]\nlisten = "127.0.0.1:{va}"\n')
        (base / "birthline.toml").write_text(text)
        config = load_config(base / "birthline.toml")
        stations = args.stations * 2  # the overload phase's twice as many
        sims = [
            dataclasses.replace(s, host="127.0.0.1", tcp_port=lan) for s in _setup(config, base, 0, stations)
        ]
        with open_core(config) as core:
            issuing = core.issuing_ca().certificate
        text += (f'[cmp]\nlisten = "127.0.0.1:{cmp_port}"\n[cmp.labels.bench]\nstation = "lan00"\n'
                 f'secret_file = "{base / "cmp.secret"}"\n'
                 f"[issuance]\nmax_queued = {args.max_queued}\n")  # fmt: skip
        (base / "birthline.toml").write_text(text)
        run = Run(base, sims, va, cmp_port, secret, _issuer_hashes(issuing))
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(base / "birthline.toml")],
            stderr=open(base / "daemon.log", "wb"),  # noqa: SIM115 - the daemon's lifetime, closed with tmp
        )
        run.pid = proc.pid
        failed = 0
        try:
            await _wait_listening(lan, proc)
            await _wait_listening(cmp_port, proc)
            print(f"soak: real daemon (`birthline run`, pid {proc.pid}), {args.stations} LAN stations, OCSP"
                  f" {args.ocsp_rate}/s, CMP {args.cmp_rate}/s; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())},"
                  f" {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
            cap, cap_s = await _phase(run, sims[: args.stations], None, args.capacity_s, "CAP", 0, 0, False)
            capacity = cap.ok / cap_s
            _print_phase("capacity (back to back)", cap, cap_s)
            failed += sum(cap.errors.values())
            per_station = capacity / args.stations
            samples: list[tuple[float, int, int]] = []
            until = time.monotonic() + args.minutes * 60
            sampler = asyncio.create_task(_sampler(proc.pid, args.sample_s, until, samples))
            soak, soak_s = await _phase(run, sims[: args.stations], 2 / per_station, args.minutes * 60, "SOAK",
                                        args.ocsp_rate, args.cmp_rate, False)  # fmt: skip
            await sampler
            print(f"  soak at half capacity ({capacity / 2:.0f} devices/s asked) for {args.minutes:g} min:")
            _print_phase("soak", soak, soak_s)
            failed += sum(soak.errors.values())
            growth = _print_rss(samples, args.rss_growth_mib)
            if growth:
                print(f"  MEMORY: {growth}")
                failed += 1
            over, over_s = await _phase(run, sims, 1 / per_station, args.overload_minutes * 60, "OVER",
                                        args.ocsp_rate, args.cmp_rate, True)  # fmt: skip
            print(f"  overload at twice capacity ({2 * capacity:.0f} devices/s asked, {stations} stations,"
                  f" max_queued {args.max_queued}) for {args.overload_minutes:g} min:")  # fmt: skip
            _print_phase("overload", over, over_s)
            failed += sum(over.errors.values())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        problems = _checks(run)
        for p in problems:
            print(f"  CHECK FAILED: {p}")
        print(f"  checks after the run: {'all passed' if not problems else f'{len(problems)} failed'}")
        return 1 if failed or problems else 0


def _print_rss(samples: list[tuple[float, int, int]], bound_mib: float) -> str:
    """Print RSS over the soak; a problem (else "") when the peak of its last tenth is more than `bound_mib` above
    the peak of its first tenth, for the main process or with its prepare workers: growth, not a level."""
    if not samples:
        return "no RSS sample was taken"
    step = max(1, len(samples) // 12)
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    print("  daemon RSS over time (s: main MiB / with prepare workers MiB): "
          + ", ".join(f"{t:.0f}: {m / 1024:.0f}/{a / 1024:.0f}" for t, m, a in shown))  # fmt: skip
    mains = [m for _, m, _ in samples]
    tenth = max(1, len(samples) // 10)
    first, last = max(mains[:tenth]), max(mains[-tenth:])
    print(
        f"  RSS of the main process: {min(mains) / 1024:.0f}..{max(mains) / 1024:.0f} MiB; peak of the first"
        f" tenth {first / 1024:.0f} MiB, of the last tenth {last / 1024:.0f} MiB ({(last - first) / 1024:+.1f} MiB;"
        f" bound +{bound_mib:g} MiB)"
    )
    alls = [a for _, _, a in samples]
    grew = {
        "main process": (max(mains[-tenth:]) - max(mains[:tenth])) / 1024,
        "with prepare workers": (max(alls[-tenth:]) - max(alls[:tenth])) / 1024,
    }
    over = [f"{what} grew {mib:+.1f} MiB" for what, mib in grew.items() if mib > bound_mib]
    return "; ".join(over) + f" over the soak (bound +{bound_mib:g} MiB)" if over else ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--overload-minutes", type=float, default=2.0)
    p.add_argument("--stations", type=int, default=20)
    p.add_argument("--capacity-s", type=float, default=30.0)
    p.add_argument("--ocsp-rate", type=float, default=20.0)
    p.add_argument("--cmp-rate", type=float, default=2.0)
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--rss-growth-mib", type=float, default=8.0,
                   help="fail if the RSS peak of the soak's last tenth exceeds its first tenth's by more (8)")  # fmt: skip
    p.add_argument("--max-queued", type=int, help="[issuance] max_queued; default: stations + 4")
    args = p.parse_args()
    if args.max_queued is None:
        # The capacity and soak phases never have more than `stations` ENROLLs (and a CMP request or two) in the
        # queue, so none of theirs is shed; the overload phase has twice that in flight.
        args.max_queued = args.stations + 4
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
