"""OCSP answers per second for concurrent HTTP clients, with the raw HSM sign rate of the same run beside it.

    python bench/ocsp.py [--certs 10000] [--clients 50] [--warm 20000] [--nonce 2000] [--depth 16]

A fresh SoftHSM2 token and journal: root and issuing CA, a handful of device certificates issued through the
real IssueService, and `--certs` issuance rows written straight into SQLite with fresh random serials of the
issuing CA (1% of them revoked). The VA is served over HTTP on 127.0.0.1 and `--clients` aiohttp clients POST
OCSP requests (SHA-1 CertIDs, as openssl sends them) in three phases:

    cold   every certificate once: every answer is a cache miss, i.e. one HSM signature
    warm   random certificates of the set again: answered from the cache, no signature
    nonce  requests with a nonce: always signed fresh

Clients and server share one event loop and one CPU here, so these HTTP figures include the client's cost.

Then the line rate, on the OCSP line listener (appliance/va/fastpath.py) with answers made ahead of time
(OcspResponder.presign, timed: answers signed per second in batches of --presign-batch): a load generator in
its own process (bench/ocsp_load.py; its CPU time is printed) sends the warm requests over --clients
keep-alive connections, --depth requests pipelined on each, then again with one request in flight per
connection, and the nonce requests (each signed fresh). The first line matching "warm / raw" is the
pipelined line-rate figure.

Figures are ratios within one run: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import multiprocessing
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from appliance import ca as ca_mod
from appliance.audit.log import AuditLog
from appliance.connections import HttpLimits
from appliance.issuance.activity import Activity
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.profiles import builtin_profiles, new_serial_number
from appliance.va import revocation as rv
from appliance.va.fastpath import OcspListener
from appliance.va.http import VaServer, make_app
from appliance.va.service import ValidationAuthority, VaSettings
from bench.issue import make_csrs, raw_sign_rate
from bench.ocsp_load import run_load
from hsm.softhsm import create_softhsm_token
from hsm.token import Token

SHA1 = hashes.SHA1()  # noqa: S303 - CertID hash, as openssl sends it


def _limits(clients: int) -> HttpLimits:
    # Every load client connects from 127.0.0.1: the per-address cap is the whole cap here.
    return HttpLimits(max_connections=4 * clients, max_connections_per_peer=4 * clients)


def request(name_hash: bytes, key_hash: bytes, serial: int, nonce: bool = False) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(name_hash, key_hash, serial, SHA1)
    if nonce:
        builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def populate(journal: Journal, audit: AuditLog, n: int, cert_der: bytes) -> list[int]:
    serials = [new_serial_number() for _ in range(n)]

    def txn(conn: sqlite3.Connection) -> None:
        now = time.time()
        conn.executemany(
            "INSERT INTO issuance (request_id, station, profile, ca, device_serial, public_key_sha256, csr_sha256,"
            " cert_serial, tbs_sha256, state, cert_der, created_at, issued_at)"
            " VALUES (?, 'bench', 'idevid', 'issuing', ?, ?, ?, ?, ?, 'issued', ?, ?, ?)",
            [
                (f"r{i}", f"BULK{i:06d}", hashlib.sha256(b"k%d" % i).digest(), hashlib.sha256(b"c%d" % i).digest(),
                 format(s, "x"), hashlib.sha256(b"t%d" % i).digest(), cert_der, now, now)
                for i, s in enumerate(serials)
            ],
        )  # fmt: skip
        targets = [(format(s, "x"), "issuing", f"BULK{i:06d}") for i, s in enumerate(serials) if i % 100 == 0]
        rv.revoke_in_transaction(
            conn, audit, "bench", targets, rv.Reason.KEY_COMPROMISE, rv.Source.CLI, now=now
        )

    journal.call(journal.transaction, txn, "bench rows")
    return serials


async def phase(url: str, requests: list[bytes], clients: int) -> tuple[float, dict[str, int]]:
    queue = list(reversed(requests))
    counts: dict[str, int] = {}

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            body = queue.pop()
            async with session.post(
                url, data=body, headers={"Content-Type": "application/ocsp-request"}
            ) as r:
                resp = ocsp.load_der_ocsp_response(await r.read())
            key = resp.response_status.name
            if resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL:
                key = resp.certificate_status.name
            counts[key] = counts.get(key, 0) + 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return len(requests) / (time.perf_counter() - t0), counts


def mixed(
    args: argparse.Namespace, loadgen: concurrent.futures.ProcessPoolExecutor, journal: Journal, token: Token,
    audit: AuditLog, issuing: ca_mod.CaRecord, warm: list[bytes], nonced: list[bytes],
) -> None:  # fmt: skip
    """The priority rules measured: issuance rounds alone, with OCSP load (warm pipelined requests with one
    nonce request in ten mixed in, from the load generator's process, through the line listener) under the
    daemon's rules, and with the same load but without the while-issuing budget, alternated; then the medians
    compared. Certificates sign before OCSP answers at the HSM in both loaded kinds (hsm/worker.py lanes)."""
    key = token.get_key(issuing.key_label)
    profiles = {"idevid": builtin_profiles()["idevid"]}
    kinds = ("alone", "rules", "no-budget")
    print(f"making {args.issue} device CSRs per round (not timed) ...", flush=True)
    # A device key is certified once: fresh keys per round.
    rounds = [make_csrs(args.issue) for _ in range(3 * len(kinds))]
    load = [b for i, w in enumerate(warm) for b in ((w, nonced[i % len(nonced)]) if i % 9 == 0 else (w,))]
    # Every load client is 127.0.0.1 and stands for many relying parties: the per-client budgets are out of its
    # reach, and so are the totals of fresh signatures (one answer in ten has a nonce: each is signed). What
    # holds it back is the while-issuing budget of all clients together, at its default unless --while-issuing.
    settings = VaSettings(
        cache_max=max(100_000, 2 * args.certs), sign_rate_per_client=1e6, sign_burst_per_client=10**6,
        sign_rate_total=1e6, request_rate_per_client=1e6, request_burst_per_client=10**6,
        presign_max=args.certs + 100, presign_batch=args.presign_batch, max_inflight_signs=64,
        max_pending_signs=10**6, request_rate_while_issuing=args.while_issuing,
    )  # fmt: skip
    activity = Activity()
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    ocsp_rates: dict[str, list[float]] = {k: [] for k in kinds[1:]}
    yielded: dict[str, int] = {k: 0 for k in kinds[1:]}
    try_later: dict[str, int] = {k: 0 for k in kinds[1:]}

    async def run() -> None:
        async with ValidationAuthority(journal, token, audit, settings, issuing=activity.busy) as va:
            await va.responder.presign()
            async with OcspListener(va.responder, "127.0.0.1", 0, _limits(args.clients)) as server:
                for rnd in range(len(rounds)):
                    kind = kinds[rnd % len(kinds)]
                    va.responder.issuing = activity.busy if kind == "rules" else (lambda: False)
                    csrs = rounds[rnd]
                    # One prepare worker, as the daemon by default: the CSR checks then leave this process's
                    # GIL to the VA (inline, they competed with every OCSP answer for it).
                    service = IssueService(
                        journal, issuing, key, profiles, batch_max=256, prepare_workers=1, activity=activity
                    )
                    async with service:
                        pending = None
                        if kind != "alone":
                            pending = asyncio.get_running_loop().run_in_executor(
                                loadgen, run_load, "127.0.0.1", server.port, load, args.clients, args.depth
                            )
                            on = server.requests
                            while server.requests - on < 1000:  # the load is on
                                await asyncio.sleep(0.01)
                            before, held_before = server.requests, va.responder.yielded
                            refused_before = va.responder.yielded_refused
                        t0 = time.perf_counter()
                        await asyncio.gather(*(
                            service.issue(IssueRequest(f"MIX{rnd}-{i:06d}", c)) for i, c in enumerate(csrs)
                        ))  # fmt: skip
                        elapsed = time.perf_counter() - t0
                        rates[kind].append(args.issue / elapsed)
                        if pending is not None:
                            ocsp_rates[kind].append((server.requests - before) / elapsed)
                            yielded[kind] += va.responder.yielded - held_before
                            try_later[kind] += va.responder.yielded_refused - refused_before
                            wall, _, _ = await pending
                            if wall < elapsed:
                                print(
                                    "  (the OCSP load ended before the issuance round: use a larger --warm)"
                                )

    asyncio.run(run())
    alone = statistics.median(rates["alone"])
    print(
        f"\nissuance with OCSP load beside it, {args.issue} certificates per round, 3 alternated rounds of each"
        f" kind (1 prepare worker, as the daemon; request_rate_while_issuing {args.while_issuing:g}/s):"
    )
    print(
        f"  issuance alone:             {alone:8.0f} certificates/s  ({', '.join(f'{r:.0f}' for r in rates['alone'])})"
    )
    for kind, label in (("no-budget", "OCSP load, no budget"), ("rules", "OCSP load, daemon rules")):
        loaded = statistics.median(rates[kind])
        print(
            f"  {label + ':':27} {loaded:8.0f} certificates/s  ({', '.join(f'{r:.0f}' for r in rates[kind])});"
            f" OCSP {statistics.median(ocsp_rates[kind]):.0f} answers/s meanwhile (1 in 10 with a nonce),"
            f" {yielded[kind]} held for issuance, {try_later[kind]} answered tryLater for it"
        )
    print(f"  loaded / alone, no budget: {statistics.median(rates['no-budget']) / alone:8.1%}")
    print(f"  loaded / alone:            {statistics.median(rates['rules']) / alone:8.1%}  (goal >= 80%)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--certs", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--warm", type=int, default=20000)
    ap.add_argument("--nonce", type=int, default=2000)
    ap.add_argument("--depth", type=int, default=16, help="line listener: requests pipelined per connection")
    ap.add_argument("--presign-batch", type=int, default=128, help="answers per HSM call when pre-signing")
    ap.add_argument("--mixed", action="store_true", help="issuance alone and with OCSP load beside it")
    ap.add_argument("--issue", type=int, default=3000, help="with --mixed: certificates per issuance round")
    ap.add_argument(
        "--while-issuing", type=float, default=VaSettings.request_rate_while_issuing,
        help="with --mixed: [va] request_rate_while_issuing (default: the daemon's)",
    )  # fmt: skip
    args = ap.parse_args()
    # The load generator's process, started before the token exists (spawn: it shares nothing with us).
    loadgen = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    loadgen.submit(int, 0).result()

    with tempfile.TemporaryDirectory(prefix="birthline-bench-ocsp-") as tmp:
        softhsm = create_softhsm_token(Path(tmp) / "softhsm", label="bench")
        with Token.open(softhsm.hsm_config()) as token, Journal(Path(tmp) / "journal.sqlite") as journal:
            audit = AuditLog(journal)
            ca_mod.create_root(journal, token, "root", "CN=Bench Root")
            issuing = ca_mod.create_issuing(journal, token, "issuing", "CN=Bench Issuing", "root")

            async def issue_a_few() -> bytes:
                service = IssueService(
                    journal,
                    issuing,
                    token.get_key(issuing.key_label),
                    {"idevid": builtin_profiles()["idevid"]},
                )
                async with service:
                    results = [
                        await service.issue(IssueRequest(f"REAL{i}", c)) for i, c in enumerate(make_csrs(5))
                    ]
                return results[0].certificate

            cert_der = asyncio.run(issue_a_few())
            print(f"populating {args.certs} issuance rows (not timed) ...", flush=True)
            serials = populate(journal, audit, args.certs, cert_der)
            cert = issuing.certificate
            probe = (
                ocsp.OCSPRequestBuilder()
                .add_certificate(x509.load_der_x509_certificate(cert_der), cert, SHA1)
                .build()
            )
            name_hash, key_hash = probe.issuer_name_hash, probe.issuer_key_hash
            cold = [request(name_hash, key_hash, s) for s in serials]
            rng = random.Random(1)
            warm = [cold[rng.randrange(len(cold))] for _ in range(args.warm)]
            nonced = [
                request(name_hash, key_hash, rng.choice(serials), nonce=True) for _ in range(args.nonce)
            ]

            if args.mixed:
                mixed(args, loadgen, journal, token, audit, issuing, warm, nonced)
                loadgen.shutdown()
                return
            raw_before = raw_sign_rate(token, issuing.key_label, 5000)

            async def run() -> tuple[
                list[tuple[str, int, float, dict[str, int]]], float, float, int, list[str]
            ]:
                # Capacity, not policy: every client here is 127.0.0.1, so the per-client pacing and signing
                # budgets (docs/revocation.md, "Load") are set out of reach; bench/ocsp_flood.py measures those.
                settings = VaSettings(
                    cache_max=max(100_000, 2 * args.certs), sign_rate_per_client=1e6, sign_burst_per_client=10**6,
                    sign_rate_total=1e6, request_rate_per_client=1e6, request_burst_per_client=10**6,
                    presign_batch=args.presign_batch, max_inflight_signs=128, max_pending_signs=10**6,
                )  # fmt: skip
                async with ValidationAuthority(journal, token, audit, settings) as va:
                    async with VaServer(make_app(va), "127.0.0.1", 0) as server:
                        url = server.url + "/ocsp"
                        rows = []
                        for name, reqs in (("cold", cold), ("warm", warm), ("nonce", nonced)):
                            rate, counts = await phase(url, reqs, args.clients)
                            rows.append((name, len(reqs), rate, counts))
                    # in-process cost of one answer, without HTTP
                    responder = va.responder
                    n = 5000
                    t0 = time.perf_counter()
                    for r in warm[:n]:
                        await responder.aanswer(r)
                    hit_us = (time.perf_counter() - t0) / n * 1e6
                    t0 = time.perf_counter()
                    for r in nonced[:200]:
                        await responder.aanswer(r)
                    miss_us = (time.perf_counter() - t0) / 200 * 1e6
                # A second VA on the same journal and signer, with an empty cache: pre-signing makes every answer.
                async with ValidationAuthority(journal, token, audit, settings) as va2:
                    line = await line_rate(va2, warm, nonced)
                return rows, hit_us, miss_us, responder.signed, line

            async def line_rate(va: ValidationAuthority, warm: list[bytes], nonced: list[bytes]) -> list[str]:
                responder = va.responder
                responder.presign_max = args.certs + 100
                t0 = time.perf_counter()
                made = await responder.presign()
                presign_rate = rates["presign"] = made / (time.perf_counter() - t0)
                out = [f"  presign {made:6d} answers:  {presign_rate:8.0f} answers/s signed ahead, "
                       f"{args.presign_batch} per HSM call"]  # fmt: skip
                loop = asyncio.get_running_loop()
                async with OcspListener(responder, "127.0.0.1", 0, _limits(args.clients)) as server:
                    for name, reqs, depth in (
                        ("warm", warm, args.depth),
                        ("warm-1", warm, 1),
                        ("nonce", nonced, args.depth),
                    ):
                        fast0 = server.fast
                        wall, cpu, counts = await loop.run_in_executor(
                            loadgen, run_load, "127.0.0.1", server.port, reqs, args.clients, depth
                        )
                        rate = len(reqs) / wall
                        rates[name] = rate
                        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                        out.append(f"  {name:<6} {len(reqs):6d} requests: {rate:8.0f} answers/s  depth {depth},"
                                   f" {server.fast - fast0} from bytes alone, generator CPU {cpu / wall:.0%} of"
                                   f" its wall time ({detail})")  # fmt: skip
                return out

            rates: dict[str, float] = {}
            rows, hit_us, miss_us, signed, line = asyncio.run(run())
            raw_after = raw_sign_rate(token, issuing.key_label, 5000)
            raw = (raw_before + raw_after) / 2
            loadgen.shutdown()

            print(f"\nOCSP line listener on 127.0.0.1 (appliance/va/fastpath.py), answers made ahead of time,"
                  f" {args.clients} connections, load generator in its own process")  # fmt: skip
            print("\n".join(line))
            print(
                f"  raw HSM C_Sign:          {raw:8.0f} signatures/s (before {raw_before:.0f}, after {raw_after:.0f})"
            )
            print(
                f"  warm / raw sign:         {rates['warm'] / raw:8.2f}x  (pipelined, depth {args.depth}; goal >= 2)"
            )
            print(
                f"  warm-1 / raw sign:       {rates['warm-1'] / raw:8.2f}x  (one request in flight per connection)"
            )
            print(f"  nonce / raw sign:        {rates['nonce'] / raw:8.1%}  (goal >= 25%)")
            print(
                f"  presign / raw sign:      {rates['presign'] / raw:8.1%}  (signed in batches, each verified)"
            )

            print(f"\nOCSP over HTTP on 127.0.0.1, {args.clients} concurrent clients, {args.certs} certificates"
                  f" ({args.certs // 100} revoked)")  # fmt: skip
            for name, count, rate, counts in rows:
                detail = ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))
                print(f"  {name:<6} {count:6d} requests: {rate:8.0f} answers/s   ({detail})")
            print(
                f"  raw HSM C_Sign:          {raw:8.0f} signatures/s (before {raw_before:.0f}, after {raw_after:.0f})"
            )
            print(f"  cold / raw sign:         {rows[0][2] / raw:8.1%}")
            print(f"  aiohttp warm:raw sign:   {rows[1][2] / raw:8.2f}x")
            print(f"  in-process answer, cache hit:      {hit_us:8.1f} us")
            print(f"  in-process answer, nonce (signed): {miss_us:8.1f} us")
            print(f"  HSM signatures by the responder:   {signed}")


if __name__ == "__main__":
    main()
