"""Issuance alone, and issuance during a 16-thread OCSP nonce flood, in the same run (issue 10 item 3).

    python bench/ocsp_flood.py [--stations 20] [--devices 60] [--threads 16] [--rounds 3] [--unprotected] [--no-pacing]
                               [--compare SRC] [--kind ocsp|crl|metrics]

A fresh appliance (SoftHSM2 token, root/issuing/management CAs, journal) runs as its own process
(`birthline run`), as on the appliance, with the LAN station listener and the VA (CRL/OCSP) on 127.0.0.1.
`--stations` simulated LAN fixtures (stations.simulator, in this process) each enrol and confirm `--devices`
devices, first alone, then while another process floods POST /ocsp from `--threads` threads: every request
with a fresh 16-octet nonce, for random serials of the issuing CA, one keep-alive connection per thread.
Phases alternate (alone, flood, alone, flood, ...) for `--rounds` rounds so the machine's noise falls on both;
printed: the median devices/s alone and during the flood, their ratio, and what the flood got (answers signed
with its nonce, cached answers without it, tryLater) per second. `--kind crl` floods GET /crl/issuing.crl
instead, `--kind metrics` GET /metrics on the daemon's metrics listener (`[metrics] listen`, enabled for that
kind), each thread as fast as it is answered; what the flood got is then counted by HTTP status.

`--compare SRC` repeats the rounds with the daemon run from another source tree (`git archive main | tar -x -C
SRC`), for a before/after in one run. `--unprotected` repeats them on a daemon whose request pacing and signing
budgets are set out of reach, so only the PKCS#11 thread's priority lanes and the in-flight cap stand between the
flood and issuance; `--no-pacing` on one with the signing budgets but no request pacing.

The flood, the fixtures and the daemon share this machine's cores (2 here, and other work); figures are ratios
within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from bench.stations import CONFIG, _free_port, _setup, _wait_listening
from stations.simulator import SimStation, simulate

SHA1 = hashes.SHA1()  # noqa: S303 - CertID hash, as openssl sends it
UNPROTECTED = """\
sign_rate_per_client = 100000
sign_burst_per_client = 100000
sign_rate_total = 100000
request_rate_per_client = 1000000
request_burst_per_client = 1000000
"""
NO_PACING = """\
request_rate_per_client = 1000000
request_burst_per_client = 1000000
"""


# -- the flood (a separate process: `ocsp_flood.py --flood HOST:PORT NAMEHASH KEYHASH THREADS`) ----------------
def _request(name_hash: bytes, key_hash: bytes, serial: int) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(name_hash, key_hash, serial, SHA1)
    builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


GET_PATH = {"crl": "/crl/issuing.crl", "metrics": "/metrics"}


def flood(address: str, name_hash: bytes, key_hash: bytes, threads: int, kind: str = "ocsp") -> None:
    """POST nonce requests (`kind` ocsp; else GETs of GET_PATH[kind]) from `threads` threads until SIGTERM; then
    print the counts as JSON."""
    host, port = address.rsplit(":", 1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def worker(n: int) -> None:
        rng = random.Random(n)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        local: Counter[str] = Counter()
        while not stop.is_set():
            if kind != "ocsp":
                try:
                    conn.request("GET", GET_PATH[kind])
                    r = conn.getresponse()
                    r.read()
                except (OSError, http.client.HTTPException):
                    local["connection error"] += 1
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=30)
                    continue
                local[f"HTTP {r.status}"] += 1
                continue
            body = _request(name_hash, key_hash, rng.getrandbits(63) | 1)
            try:
                conn.request("POST", "/ocsp", body, {"Content-Type": "application/ocsp-request"})
                data = conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                local["connection error"] += 1
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                continue
            resp = ocsp.load_der_ocsp_response(data)
            if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
                local[resp.response_status.name] += 1
                continue
            try:
                resp.extensions.get_extension_for_class(x509.OCSPNonce)
                local["signed with its nonce"] += 1
            except x509.ExtensionNotFound:
                local["cached, without the nonce"] += 1
        with lock:
            counts.update(local)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    print("flooding", flush=True)
    for t in pool:
        t.join()
    print(json.dumps({"elapsed": time.perf_counter() - t0, "counts": counts}), flush=True)


# -- the run -----------------------------------------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far, all its threads together (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Phase:
    rate: float  # devices/s
    failures: int
    daemon_cpu: float  # the daemon's CPU use during the phase, in cores (1.0 = one core busy)


async def _phase(sims: list[SimStation], devices: int, prefix: str, daemon_pid: int) -> Phase:
    cpu0, t0 = _cpu_s(daemon_pid), time.perf_counter()
    report = await simulate(sims, devices, prefix=prefix)
    cpu = (_cpu_s(daemon_pid) - cpu0) / (time.perf_counter() - t0)
    return Phase(report.devices_per_s, report.failures, cpu)


def _start_daemon(config_path: Path, src: Path | None = None) -> subprocess.Popen[bytes]:
    """`birthline run`, from this tree or (for a comparison) from the source tree `src`."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(config_path)],
        stderr=subprocess.DEVNULL, cwd=src, env=env,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _with_flood(
    sims: list[SimStation],
    devices: int,
    prefix: str,
    daemon_pid: int,
    va: str,
    hashes_: tuple[bytes, bytes],
    threads: int,
    kind: str,
) -> tuple[Phase, dict[str, object]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--flood", va, hashes_[0].hex(), hashes_[1].hex(), str(threads), kind,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    await proc.stdout.readline()  # "flooding": threads started
    await asyncio.sleep(1.0)  # let the flood reach its steady state before the clock starts
    try:
        phase = await _phase(sims, devices, prefix, daemon_pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await proc.communicate()
    return phase, json.loads(out.decode().strip().splitlines()[-1])


def _issuer_hashes(issuing: x509.Certificate) -> tuple[bytes, bytes]:
    """CertID's issuerNameHash and issuerKeyHash (SHA-1) for certificates issued by `issuing`."""
    from appliance import der

    spki = issuing.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    bits = der.read_children(spki, der.read_tlv(spki))[1]

    def sha1(data: bytes) -> bytes:
        h = hashes.Hash(SHA1)
        h.update(data)
        return h.finalize()

    return sha1(issuing.subject.public_bytes()), sha1(spki[bits.content + 1 : bits.end])


def _describe(result: dict[str, object]) -> str:
    elapsed = float(str(result["elapsed"]))
    counts = result["counts"]
    assert isinstance(counts, dict)
    total = sum(int(v) for v in counts.values())
    parts = ", ".join(f"{k} {int(v) / elapsed:,.0f}/s" for k, v in sorted(counts.items()))
    return f"{total / elapsed:,.0f} answers/s ({parts})"


@dataclasses.dataclass
class Setup:
    base: Path
    sims: list[SimStation]
    lan_port: int
    va_port: int
    hashes: tuple[bytes, bytes]
    kind: str = "ocsp"
    metrics_port: int = 0


async def _rounds(
    setup: Setup, config: Path, src: Path | None, rounds: int, devices: int, threads: int, tag: str
) -> tuple[list[Phase], list[Phase], list[dict[str, object]]]:
    """Alternate `rounds` times: issuance alone, then issuance during the flood (the machine's noise then falls
    on both alike). Returns the phases alone, the phases during the flood, and what each flood got."""
    proc = _start_daemon(config, src)
    alone: list[Phase] = []
    during: list[Phase] = []
    floods: list[dict[str, object]] = []
    va = f"127.0.0.1:{setup.metrics_port if setup.kind == 'metrics' else setup.va_port}"
    try:
        await _wait_listening(setup.lan_port, proc)
        await _wait_listening(setup.va_port, proc)
        # TLS sessions, worker processes, caches
        await _phase(setup.sims, max(2, devices // 5), f"{tag}W", proc.pid)
        for r in range(rounds):
            alone.append(await _phase(setup.sims, devices, f"{tag}A{r}", proc.pid))
            phase, got = await _with_flood(
                setup.sims, devices, f"{tag}F{r}", proc.pid, va, setup.hashes, threads, setup.kind
            )
            during.append(phase)
            floods.append(got)
    finally:
        _stop(proc)
    return alone, during, floods


def _report(title: str, alone: list[Phase], during: list[Phase], floods: list[dict[str, object]]) -> None:
    a = statistics.median(p.rate for p in alone)
    d = statistics.median(p.rate for p in during)
    print(title)
    print(f"    issuance alone:              median {a:7.1f} devices/s  (rounds: {_list(alone)})")
    print(f"    issuance during the flood:   median {d:7.1f} devices/s  (rounds: {_list(during)})")
    print(f"    during / alone:              {d / a:7.0%}  (per round: "
          f"{', '.join(f'{y.rate / x.rate:.0%}' for x, y in zip(alone, during, strict=True))})")  # fmt: skip
    ca = statistics.median(p.daemon_cpu for p in alone)
    cd = statistics.median(p.daemon_cpu for p in during)
    print(f"    daemon CPU (cores, median):  alone {ca:.2f}, during the flood {cd:.2f}; per device"
          f" {1000 * ca / a:.2f} ms alone, {1000 * cd / d:.2f} ms during")  # fmt: skip
    print(f"    the flood got (last round):  {_describe(floods[-1])}")


def _list(phases: list[Phase]) -> str:
    return ", ".join(f"{p.rate:.0f}" for p in phases)


async def run(args: argparse.Namespace) -> int:
    from appliance.config import load_config
    from appliance.runtime import open_core
    from hsm.softhsm import create_softhsm_token

    with tempfile.TemporaryDirectory(prefix="birthline-bench-flood-") as tmp:
        base = Path(tmp)
        lan_port, va_port = _free_port(), _free_port()
        token = create_softhsm_token(base / "softhsm", label="bench")
        text = CONFIG.format(base=base, module=token.module, label=token.label, pin=token.pin_file,
                             conf=token.conf_path, port=lan_port)  # fmt: skip
        text = text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{va_port}"')
        metrics_port = _free_port()
        tail = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n' if args.kind == "metrics" else ""
        (base / "birthline.toml").write_text(text + tail)
        (base / "unprotected.toml").write_text(text + UNPROTECTED + tail)
        (base / "no-pacing.toml").write_text(text + NO_PACING + tail)
        config = load_config(base / "birthline.toml")
        sims = [
            dataclasses.replace(s, host="127.0.0.1", tcp_port=lan_port)
            for s in _setup(config, base, 0, args.stations)
        ]
        with open_core(config) as core:
            issuing = core.issuing_ca().certificate
        setup = Setup(base, sims, lan_port, va_port, _issuer_hashes(issuing), args.kind, metrics_port)
        what = {"ocsp": "nonce requests", "crl": "CRL GETs", "metrics": "/metrics scrapes"}[args.kind]
        print(f"{args.stations} LAN stations x {args.devices} devices over TLS per phase, real daemon"
              f" (`birthline run`); flood: {args.threads} threads of {what} from one address;"
              f" {args.rounds} rounds")  # fmt: skip
        runs = [("this tree, defaults:", base / "birthline.toml", None)]
        if args.unprotected:
            runs.append(("pacing and budgets out of reach (priority lanes and the in-flight cap only):",
                         base / "unprotected.toml", None))  # fmt: skip
        if args.no_pacing:
            runs.append(("signing budgets, request pacing out of reach:", base / "no-pacing.toml", None))
        if args.compare:
            runs.append((f"the daemon from {args.compare}:", base / "birthline.toml", args.compare))
        failed = 0
        for i, (title, config_path, src) in enumerate(runs):
            alone, during, floods = await _rounds(
                setup, config_path, src, args.rounds, args.devices, args.threads, f"R{i}"
            )
            _report(title, alone, during, floods)
            failed += sum(p.failures for p in [*alone, *during])
        if failed:
            print(f"  {failed} enrolments failed")
    return 1 if failed else 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--flood":
        _, _, address, name_hash, key_hash, threads, kind = sys.argv
        flood(address, bytes.fromhex(name_hash), bytes.fromhex(key_hash), int(threads), kind)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--stations", type=int, default=20)
    ap.add_argument("--devices", type=int, default=60)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--unprotected", action="store_true")
    ap.add_argument("--no-pacing", action="store_true")
    ap.add_argument(
        "--kind", choices=["ocsp", "crl", "metrics"], default="ocsp", help="what the flood asks for"
    )
    ap.add_argument(
        "--compare", type=Path, help="also run the daemon from this source tree (e.g. an export of main)"
    )
    args = ap.parse_args()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
