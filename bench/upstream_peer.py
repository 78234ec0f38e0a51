"""A real Birthline instance as the upstream CA, in a process of its own, for bench/upstream.py --upstream birthline.

    python bench/upstream_peer.py DIR RA_CERT_PEM QUANTITY

In DIR: a fresh SoftHSM2 token, a journal with the CA hierarchy (root, issuing, management), the production floor
(station bench-st on line L1, an active work order of QUANTITY units for serials matching PATTERN), the RA key
`cmp-ra` in the token certified by the management CA (DIR/cmp-ra.pem), and the issuance core and CMP server as
the daemon builds them (work-order policy, audit log, the daemon's default batch and pipeline settings). One
label, `ra`, acts as station bench-st and trusts signatures by certificates issued by RA_CERT_PEM (the bench's
forwarder RA), nested messages allowed.

Prints ONE JSON line on stdout once it serves on 127.0.0.1 (port 0: any free one):
    {"port": ..., "url": ".../.well-known/cmp/p/ra", "ra_cert": "DIR/cmp-ra.pem", "journal": "DIR/journal.sqlite"}
then serves until stdin closes or it gets SIGTERM / SIGINT, and exits 0 after a clean stop (the journal closed).
Each line "stats" on its stdin is answered with one JSON line of the issuance core's and CMP responder's counters.
With BENCH_PEER_PROFILE=FILE the serving part runs under cProfile (the event loop's thread) and the stats go to
FILE at the stop.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509

from appliance import ca as ca_mod
from appliance.audit.log import AuditLog
from appliance.cmp.ra import ensure_ra
from appliance.cmp.server import CmpLabel, CmpResponder, make_cmp_app
from appliance.config import IssuanceSection, JournalSection
from appliance.issuance.journal import Journal
from appliance.issuance.service import IssueService
from appliance.production.policy import WorkOrderPolicy
from appliance.profiles import builtin_profiles
from appliance.va.http import VaServer
from bench.issue import floor
from bench.stdin_control import until_stdin_closes
from hsm.softhsm import create_softhsm_token
from hsm.token import Token

PATTERN = "BENCH[0-9]{8}"
"""The work order's allowlist: the bench's device serials are BENCH00000000, BENCH00000001, ..."""
LABEL = "ra"
STATION = "bench-st"


def device_serial(i: int) -> str:
    return f"BENCH{i:08d}"


async def serve(directory: Path, ra_cert: x509.Certificate, quantity: int) -> None:
    softhsm = create_softhsm_token(directory / "softhsm", label="bench-upstream")
    with Token.open(softhsm.hsm_config()) as token, Journal(directory / "journal.sqlite") as journal:
        ca_mod.create_root(journal, token, "root", "O=Birthline Bench,CN=Bench Upstream Root CA")
        issuing = ca_mod.create_issuing(journal, token, "issuing", "O=Birthline Bench,CN=Bench Upstream CA",
                                        "root")  # fmt: skip
        management = ca_mod.create_management(journal, token, "management",
                                              "O=Birthline Bench,CN=Bench Upstream Management CA")  # fmt: skip
        floor(journal, quantity, stations=(STATION,), pattern=PATTERN)
        audit = AuditLog(journal)
        ra = ensure_ra(token, management, directory / "cmp-ra.pem")
        label = CmpLabel(LABEL, STATION, trusted_cas=(ra_cert,), allow_nested=True, accept_ra_verified=True,
                         allow_rr=True)  # fmt: skip
        # As the daemon builds it (appliance/runtime.py Core.issue_service) with the configuration's defaults.
        iss = IssuanceSection()
        service = IssueService(
            journal, issuing, token.get_key(issuing.key_label), {"idevid": builtin_profiles()["idevid"]},
            default_profile=iss.default_profile, policy=WorkOrderPolicy(issuing.name), audit=audit,
            batch_max=JournalSection(directory / "journal.sqlite").batch_max, max_csr_bytes=iss.max_csr_bytes,
            clock_skew_s=iss.clock_skew_s, prepare_workers=iss.prepare_workers, pipeline_depth=iss.pipeline_depth,
            refusal_burst=iss.refusal_burst, refusal_window_s=iss.refusal_window_s,
        )  # fmt: skip
        async with service:
            responder = CmpResponder(service, journal, audit, {LABEL: label},
                                     management_ca=management.certificate, ra=ra)  # fmt: skip
            async with VaServer(make_cmp_app(responder), "127.0.0.1", 0) as http:
                port = http.address[1]
                print(json.dumps({
                    "port": port, "url": f"http://127.0.0.1:{port}/.well-known/cmp/p/{LABEL}",
                    "ra_cert": str(directory / "cmp-ra.pem"), "journal": str(directory / "journal.sqlite"),
                }), flush=True)  # fmt: skip

                def stats() -> dict[str, Any]:
                    return {"core": service.stats, "cmp": responder.stats}

                profile_to = os.environ.get("BENCH_PEER_PROFILE")
                if not profile_to:
                    await until_stdin_closes(stats)
                    return
                import cProfile  # the event loop's thread only: not the journal, PKCS#11 or prepare workers

                prof = cProfile.Profile()
                prof.enable()
                try:
                    await until_stdin_closes(stats)
                finally:
                    prof.disable()
                    prof.dump_stats(profile_to)


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    directory, ra_cert_path, quantity = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    ra_cert = x509.load_pem_x509_certificate(ra_cert_path.read_bytes())
    directory.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(directory, ra_cert, quantity))


if __name__ == "__main__":
    main()
