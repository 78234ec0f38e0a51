"""The Birthline daemon: the issuance core behind the station server, on serial ports and a TLS listener.

    async with Daemon(config) as daemon:
        host, port = daemon.lan_address      # the TLS listener (port 0 in the config picks a free one)
        await daemon.wait()                  # until stop() (SIGTERM/SIGINT in `birthline run`)

Named tasks run in one TaskGroup: the station-registry watcher (added, disabled and rotated stations, every
``stations.registry_poll_s``) and one task per enabled serial station, which reopens its port every
``stations.reopen_interval_s`` while it is unplugged. No task lets an exception out: a failing port or station
is logged and retried, never the end of the daemon. Station secrets are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import shlex
import signal
import ssl
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from appliance import stations_registry as reg
from appliance.alarms import LogOnce
from appliance.audit.checkpointer import Checkpointer
from appliance.audit.log import ensure_audit_key
from appliance.bind import binding
from appliance.config import Config
from appliance.connections import (
    AcceptErrors,
    ConnectionCaps,
    ConnectionGate,
    Guard,
    ensure_fd_budget,
    serve_guarded,
    tls_server_protocol,
)
from appliance.control.metrics import METRICS_LIMITS
from appliance.control.plane import ControlPlane
from appliance.daemon_enroller import CoreEnroller, CoreLinkMonitor
from appliance.daemon_lock import DaemonLock, DaemonRunning
from appliance.errors import BirthlineError
from appliance.httplisten import HttpListener, TlsServing
from appliance.issuance.journal import Journal
from appliance.issuance.prewarm import JournalPrewarm
from appliance.issuance.service import IssueService
from appliance.runtime import Core, check_state, open_core, record_start
from appliance.station_failures import LinkFailures
from appliance.stations_registry import StationRecord, TlsServerFiles, alist_stations
from appliance.va.fastpath import OcspListener
from appliance.va.http import VaServer, make_app
from appliance.va.service import ValidationAuthority
from stations.codec import FRAME_OVERHEAD, MAX_PAYLOAD, FrameDecoder
from stations.codes import Code
from stations.errors import StationError
from stations.messages import Error
from stations.server import StationServer, StationState
from stations.session import KeyLookup, plain_frame
from stations.tls import apply_tls_policy
from stations.transports.base import ChannelClosed
from stations.transports.stream import StreamChannel

if TYPE_CHECKING:
    # CMP, EST and SCEP (and the upstream forwarder, which speaks CMP) are imported where they start: off by
    # default, and their ASN.1 stacks (pyasn1 and its RFC modules) cost the daemon ~21 MB of RSS it would carry
    # for nothing (docs/performance.md "Memory"; tests/appliance/test_daemon_imports.py).
    from appliance.cmp.forwarder import Forwarder
    from appliance.cmp.server import CmpResponder
    from appliance.est.server import EstResponder
    from appliance.scep.responder import ScepResponder
    from stations.transports.serial import SerialChannel

log = logging.getLogger(__name__)

__all__ = ["Daemon", "run_daemon"]

UNKNOWN_HERE = "no station with this id is registered on this port or certificate"
LAN_WRITE_HIGH_WATER = 64 * 1024


def _started_as() -> str:
    """This process's command line (`birthline run --config ...`, `birthline demo --serve ...`), for the refusal
    another daemon or job prints while this one holds the state directory."""
    words = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    return shlex.join(words)[:200]


def server_ssl_context(files: TlsServerFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_tls_policy(ctx)
    ctx.load_cert_chain(files.cert, files.key)
    ctx.load_verify_locations(cafile=str(files.ca))
    # The management CA is the trust anchor even when an external root signed it (ca request --role
    # management): station certificates must come from it, never from another CA under the same root.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def prepare(core: Core, address: tuple[str, int] | None = None) -> TlsServerFiles:
    """The TLS server credential (made if missing or not from the current management CA, as `birthline init`
    does) for the listener on `address` (the LAN station port's by default; EST's when it serves without one).
    One for other names than the configuration's is served as it is, under the warning alarm tls.names:
    changing the names stations check is an administrator's act (`birthline tls reissue`)."""
    cfg = core.config.stations
    names = reg.server_names(core.config.appliance.names, address or cfg.lan_address)
    files = reg.ensure_tls_server(
        core.journal, core.token, cfg.tls_dir, cfg.management_ca, names=names, audit=core.audit
    )
    served = reg.served_names(files)
    if set(served) != set(names):
        core.alarms.raise_alarm(
            "tls.names",
            f"the TLS server certificate names {', '.join(served)}; the configuration names {', '.join(names)}",
            "a station connecting by a name the certificate lacks fails its hostname check: run `birthline tls"
            " reissue --user ADMIN`, then restart the daemon",
            severity="warning",
            details={"served": list(served), "configured": list(names)},
        )
    return files


def fd_caps(config: Config) -> tuple[dict[str, int], dict[str, int]]:
    """The connection caps whose sum the daemon needs in descriptors (config key -> cap, and the listeners whose
    cap is fixed): the station, VA, CMP, SCEP, EST and metrics listeners and the control socket it runs."""
    caps, fixed = {}, {}
    if config.stations.lan_address is not None:
        caps["stations.max_connections"] = config.stations.max_connections
    if config.va.address is not None:
        caps["va.max_connections"] = config.va.limits.max_connections
    if config.va.ocsp_address is not None:
        # The line listener has caps of its own, the same values as the VA's.
        fixed["the OCSP line listener ([va] max_connections)"] = config.va.limits.max_connections
    if config.cmp.address is not None:
        caps["cmp.max_connections"] = config.cmp.limits.max_connections
    if config.scep.address is not None:
        caps["scep.max_connections"] = config.scep.limits.max_connections
    if config.est.address is not None:
        caps["est.max_connections"] = config.est.limits.max_connections
    if config.control.enabled:
        caps["control.max_connections"] = config.control.max_connections
    if config.metrics.address is not None:
        fixed["the metrics listener"] = METRICS_LIMITS.max_connections
    return caps, fixed


class Daemon:
    """The running appliance. An async context manager; see the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.server: StationServer | None = None
        self.enroller: CoreEnroller | None = None
        self.core: Core | None = None
        self.tls_files: TlsServerFiles | None = None
        self._stack = contextlib.AsyncExitStack()
        self._tg: asyncio.TaskGroup | None = None
        self._lan: asyncio.Server | None = None
        self.lan_gate: ConnectionGate | None = None
        self.fd_budget: tuple[int, int] = (0, 0)  # (RLIMIT_NOFILE soft limit, listener caps + reserve)
        self._lan_handlers: set[asyncio.Task[None]] = set()
        self._serial_tasks: dict[str, asyncio.Task[None]] = {}
        self._serial_bound: dict[str, tuple[str, int, bytes]] = {}
        self._stations: dict[str, StationRecord] = {}
        self._by_fingerprint: dict[bytes, StationRecord] = {}
        self._stopped = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self.refused_lan = 0  # TLS connections whose certificate belongs to no enabled station
        # Serial ports whose adapter's latency timer was reported, with the value: said once per port and value
        # for the daemon's run, again only if it changes (the port's task restarts when its station changes).
        self._latency_said: dict[str, int] = {}
        self.link_failures: LinkFailures | None = None
        self.va: ValidationAuthority | None = None
        self.prewarm: JournalPrewarm | None = None
        self.va_server: VaServer | None = None
        self.ocsp_line: OcspListener | None = None
        self.cmp: CmpResponder | None = None
        self.cmp_server: VaServer | None = None
        self.est: EstResponder | None = None
        self.est_server: HttpListener | None = None
        self.forwarder: Forwarder | None = None
        self.control: ControlPlane | None = None
        self.scep: ScepResponder | None = None
        self.scep_server: HttpListener | None = None

    # -- what callers see ----------------------------------------------------------------------------------------
    @property
    def lan_address(self) -> tuple[str, int] | None:
        if self._lan is None or not self._lan.sockets:
            return None
        name = self._lan.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    @property
    def states(self) -> dict[str, StationState]:
        assert self.server is not None
        return self.server.states

    @property
    def journal(self) -> Journal:
        assert self.core is not None
        return self.core.journal

    def registered_stations(self) -> list[StationRecord]:
        """The station registry as last read (every stations.registry_poll_s)."""
        return list(self._stations.values())

    def stop(self) -> None:
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def __aenter__(self) -> Daemon:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        cfg = self.config.stations
        # The daemon lock says the daemon runs: its own jobs (crl generate, upstream sync) refuse meanwhile.
        check_state(self.config)
        try:
            self._stack.enter_context(
                DaemonLock(self.config.appliance.state_dir, f"the daemon `{_started_as()}`")
            )
        except DaemonRunning as exc:
            raise DaemonRunning(
                f"the daemon cannot start: {exc.message}; one daemon runs per state directory: stop that one first",
                exc.holder,
            ) from None
        self._check_fd_budget()
        self.core = self._stack.enter_context(open_core(self.config))
        accept_errors = AcceptErrors(self.core.alarms)
        accept_errors.install()
        self._stack.callback(accept_errors.uninstall)
        # Checkpoints sign the audit log in the HSM with the audit key (never the CA keys). The checkpointer
        # starts first: it signs what a crash left unsigned before this run's entries follow it.
        await self._stack.enter_async_context(
            Checkpointer(self.core.audit, ensure_audit_key(self.core.token), alarms=self.core.alarms)
        )
        record_start(self.core)
        if self.config.journal.prewarm:
            # The random-key index every certificate writes, read in order in the background (issuance/prewarm.py).
            self.prewarm = await self._stack.enter_async_context(JournalPrewarm(self.config.journal.path))
        # CRLs and OCSP: signed in the HSM ahead of requests, served over HTTP on the LAN side.
        self.va = await self._stack.enter_async_context(
            ValidationAuthority(
                self.core.journal, self.core.token, self.core.audit, self.config.va.settings,
                alarms=self.core.alarms, issuing=self.core.activity.busy,
            )
        )  # fmt: skip
        if self.config.va.address is not None:
            with binding("[va] listen", self.config.va.listen):
                self.va_server = await self._stack.enter_async_context(
                    VaServer(
                        make_app(self.va), *self.config.va.address, limits=self.config.va.limits, name="va",
                        section="va", alarms=self.core.alarms, accept_errors=accept_errors,
                    )
                )  # fmt: skip
            log.info("CRL and OCSP on %s", self.va_server.url)
        if self.config.va.ocsp_address is not None:
            limits = self.config.va.limits
            with binding("[va] ocsp_listen", self.config.va.ocsp_listen):
                self.ocsp_line = await self._stack.enter_async_context(
                    OcspListener(
                        self.va.responder, *self.config.va.ocsp_address, limits,
                        max_age=self.config.va.settings.http_max_age_s, alarms=self.core.alarms,
                        accept_errors=accept_errors,
                    )
                )  # fmt: skip
            log.info("OCSP (line listener) on %s/ocsp", self.ocsp_line.url)
        if cfg.lan_address is not None:
            self.tls_files = prepare(self.core)
        if self.config.upstream.enabled:
            # Imported here, not at the top: see TYPE_CHECKING.
            from appliance.cmp.forwarder_setup import make_forwarder

            # The forwarder first: its queue load is what local issuance consults against the hard limits.
            self.forwarder = await self._stack.enter_async_context(make_forwarder(self.core))
            log.info(
                "forwarding to the upstream CA at %s (%s)",
                self.config.upstream.url,
                self.config.upstream.mode,
            )
        service = await self._stack.enter_async_context(
            self.core.issue_service(
                admission=self.forwarder.admission if self.forwarder is not None else None
            )
        )
        await self._start_control(service, accept_errors)
        if self.config.cmp.address is not None:
            await self._start_cmp(service, accept_errors)
        if self.config.scep.address is not None:
            await self._start_scep(service, accept_errors)
        if self.config.est.address is not None:
            await self._start_est(service, accept_errors)
        self.enroller = CoreEnroller(service, self.core.journal)
        self.link_failures = await self._stack.enter_async_context(
            LinkFailures(
                self.core.audit, self.core.alarms, burst=cfg.failure_limit, window_s=cfg.failure_window_s
            )
        )
        self.server = StationServer(
            self.enroller,
            handshake_timeout=cfg.handshake_timeout_s,
            idle_timeout=cfg.idle_timeout_s,
            failure_limit=cfg.failure_limit,
            failure_window_s=cfg.failure_window_s,
            monitor=CoreLinkMonitor(self.link_failures),
        )
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._stack.push_async_callback(self._stop_tasks)
        await self.refresh()
        if cfg.lan_address is not None and self.tls_files is not None:
            await self._start_lan(server_ssl_context(self.tls_files), accept_errors)
            log.info("listening for LAN stations on %s:%d (TLS)", *(self.lan_address or ("?", 0)))
        self._watcher = self._tg.create_task(self._watch_registry(), name="station-registry-watcher")

    def _check_fd_budget(self) -> None:
        """Every listener's cap together must fit under RLIMIT_NOFILE: a flood meets a cap, never EMFILE."""
        caps, fixed = fd_caps(self.config)
        self.fd_budget = ensure_fd_budget(caps, fixed=fixed)

    async def _start_lan(self, context: ssl.SSLContext, accept_errors: AcceptErrors) -> None:
        """The TLS listener for LAN stations. Each connection is admitted by the gate before TLS allocates
        anything; TLS then has handshake_timeout_s, and the connection auth_timeout_s to authenticate a station
        session."""
        assert self.core is not None
        cfg = self.config.stations
        assert cfg.lan_address is not None
        self.lan_gate = ConnectionGate(
            "stations", ConnectionCaps(cfg.max_connections, cfg.max_connections_per_peer),
            alarms=self.core.alarms, accept_errors=accept_errors,
            advice="raise [stations] max_connections (or max_connections_per_peer) if these are stations;"
            " otherwise find the host holding the connections",
        )  # fmt: skip

        def inner(guard: Guard) -> asyncio.BaseProtocol:
            guard.set_deadline(cfg.auth_timeout_s, "unauthenticated")
            # The stream reader pauses the connection past twice its limit: two frames of the protocol.
            reader = asyncio.StreamReader(limit=MAX_PAYLOAD + FRAME_OVERHEAD)
            app = asyncio.StreamReaderProtocol(reader, functools.partial(self._spawn_lan, guard))
            return tls_server_protocol(app, context, cfg.handshake_timeout_s)

        host, port = cfg.lan_address
        with binding("[stations] lan_listen", cfg.lan_listen):
            self._lan = await serve_guarded(self.lan_gate, inner, host, port, buffered=True)

    async def _start_control(self, service: IssueService, accept_errors: AcceptErrors) -> None:
        """The control API, metrics and the disk alarm (appliance/control): before any listener takes a request,
        so every answer is seen."""
        assert self.core is not None

        # The station server is made after this (it needs the enroller); until then there is nothing to read.
        def probe() -> dict[str, tuple[bool, bool, str | None]]:
            states = self.server.states if self.server is not None else {}
            return {n: (st.connected, st.authenticated, st.peer) for n, st in states.items() if n}

        def snapshots() -> dict[str, dict[str, object]]:
            states = self.server.states if self.server is not None else {}
            return {n: st.snapshot() for n, st in states.items() if n}

        va = self.va
        self.control = await self._stack.enter_async_context(
            ControlPlane(self.core, service, probe=probe, snapshots=snapshots,
                         on_revoked=va.changed if va is not None else None, accept_errors=accept_errors,
                         cmp=lambda: self.cmp.snapshot() if self.cmp is not None else None)
        )  # fmt: skip

    async def _start_cmp(self, service: IssueService, accept_errors: AcceptErrors) -> None:
        """The CMP server on the LAN side: labels act as registered stations; answers to signature-protected
        requests are signed by the RA key in the HSM, certified by the management CA."""
        assert self.core is not None
        # Imported here, not at the top: see TYPE_CHECKING.
        from appliance.cmp.metrics import CmpCollector
        from appliance.cmp.ra import ensure_ra
        from appliance.cmp.server import (
            CmpResponder,
            labels_from_config,
            make_cmp_app,
            settings_from_config,
        )

        cfg = self.config.cmp
        management = reg.ensure_management_ca(
            self.core.journal, self.core.token, self.config.stations.management_ca,
            audit=self.core.audit, actor="appliance",
        )  # fmt: skip
        ra = ensure_ra(
            self.core.token, management, cfg.ra_cert or self.config.stations.tls_dir / "cmp-ra.pem"
        )
        va = self.va
        labels = labels_from_config(cfg)
        # A label may issue from another issuing CA (greenfield: operational certificates); each CA has its own
        # issuance service, on the same journal, HSM and audit log.
        others: dict[str, IssueService] = {}
        for name in sorted({lb.issuing_ca for lb in labels.values() if lb.issuing_ca} - {service.ca.name}):
            others[name] = await self._stack.enter_async_context(
                self.core.issue_service(admission=service.admission, ca_name=name)
            )
            # Its answers are events of the control API too (a greenfield label's operational certificates).
            others[name].observer = service.observer
        self.cmp = CmpResponder(
            service, self.core.journal, self.core.audit, labels,
            management_ca=management.certificate, ra=ra, settings=settings_from_config(cfg),
            on_revoked=va.changed if va is not None else None, services=others,
        )  # fmt: skip
        assert cfg.address is not None
        with binding("[cmp] listen", cfg.listen):
            self.cmp_server = await self._stack.enter_async_context(
                VaServer(
                    make_cmp_app(self.cmp), *cfg.address, limits=cfg.limits, name="cmp", section="cmp",
                    alarms=self.core.alarms, accept_errors=accept_errors,
                )
            )  # fmt: skip
        log.info("CMP on %s/.well-known/cmp (%d label(s))", self.cmp_server.url, len(self.cmp.labels))
        if self.control is not None and self.control.metrics is not None:
            self.control.metrics.registry.register(CmpCollector(self.cmp))

    async def _start_scep(self, service: IssueService, accept_errors: AcceptErrors) -> None:
        """The SCEP server (docs/scep.md): labels act as registered stations; the RA key in the HSM (RSA: SCEP
        encrypts to it) decrypts the requests and signs the answers, certified by the management CA."""
        assert self.core is not None
        # Imported here, not at the top: see TYPE_CHECKING.
        from appliance.scep.labels import admission_from_config as scep_admission_from_config
        from appliance.scep.labels import labels_from_config as scep_labels_from_config
        from appliance.scep.metrics import ScepCollector
        from appliance.scep.ra import ensure_scep_ra
        from appliance.scep.responder import ScepResponder
        from appliance.scep.server import make_scep_app

        cfg = self.config.scep
        management = reg.ensure_management_ca(
            self.core.journal, self.core.token, self.config.stations.management_ca,
            audit=self.core.audit, actor="appliance",
        )  # fmt: skip
        ra = ensure_scep_ra(
            self.core.token, management, cfg.ra_cert or self.config.stations.tls_dir / "scep-ra.pem"
        )
        va = self.va
        self.scep = ScepResponder(
            service, self.core.audit, scep_labels_from_config(cfg), ra, default_label=cfg.default_label,
            max_message_bytes=cfg.max_message_bytes, on_revoked=va.changed if va is not None else None,
            refusal_burst=self.config.issuance.refusal_burst, refusal_window_s=self.config.issuance.refusal_window_s,
            admission=scep_admission_from_config(cfg),
        )  # fmt: skip
        self._stack.push_async_callback(self.scep.flush_refusals)
        assert cfg.address is not None
        with binding("[scep] listen", cfg.listen):
            self.scep_server = await self._stack.enter_async_context(
                HttpListener(
                    make_scep_app(self.scep), *cfg.address, limits=cfg.limits, name="scep", section="scep",
                    alarms=self.core.alarms, accept_errors=accept_errors,
                )
            )  # fmt: skip
        log.info("SCEP on %s/scep (%d label(s))", self.scep_server.url, len(self.scep.labels))
        if self.control is not None and self.control.metrics is not None:
            self.control.metrics.registry.register(ScepCollector(self.scep))

    async def _start_est(self, service: IssueService, accept_errors: AcceptErrors) -> None:
        """The EST server (docs/est.md) over TLS on the LAN side: labels act as registered stations. Its server
        certificate is the appliance's TLS server certificate (management CA), as the station listener's."""
        assert self.core is not None
        # Imported here, not at the top: see TYPE_CHECKING.
        from appliance.est.labels import labels_from_config as est_labels_from_config
        from appliance.est.labels import settings_from_config as est_settings_from_config
        from appliance.est.server import EstResponder, make_est_app, server_context

        cfg = self.config.est
        assert cfg.address is not None
        management = reg.ensure_management_ca(
            self.core.journal, self.core.token, self.config.stations.management_ca,
            audit=self.core.audit, actor="appliance",
        )  # fmt: skip
        files = self.tls_files or prepare(self.core, cfg.address)
        labels = est_labels_from_config(cfg)
        others: dict[str, IssueService] = {}
        for name in sorted({lb.issuing_ca for lb in labels.values() if lb.issuing_ca} - {service.ca.name}):
            others[name] = await self._stack.enter_async_context(
                self.core.issue_service(admission=service.admission, ca_name=name)
            )
            # Its answers are events of the control API too (a greenfield label's operational certificates).
            others[name].observer = service.observer
        va = self.va
        self.est = EstResponder(
            service, self.core.journal, labels, est_settings_from_config(cfg, self.config.issuance.max_csr_bytes),
            management_ca=management.certificate, services=others,
            on_revoked=va.changed if va is not None else None, audit=self.core.audit,
            refusal_burst=self.config.issuance.refusal_burst, refusal_window_s=self.config.issuance.refusal_window_s,
        )  # fmt: skip
        self._stack.push_async_callback(self.est.flush_refusals)
        # The anchors a TLS client certificate may chain to: stations' (management CA), this appliance's own
        # certificates (simplereenroll) and the labels' birth-certificate roots.
        anchors = [management.certificate, *(x509.load_der_x509_certificate(c) for svc in self.est.services.values()
                                             for c in svc.chain),
                   *(root for lb in labels.values() for root in lb.idevid_roots)]  # fmt: skip
        tls = TlsServing(
            server_context(files.cert, files.key, anchors, apply_tls_policy), cfg.handshake_timeout_s
        )
        with binding("[est] listen", cfg.listen):
            self.est_server = await self._stack.enter_async_context(
                HttpListener(make_est_app(self.est), *cfg.address, limits=cfg.limits, name="est", section="est",
                             alarms=self.core.alarms, accept_errors=accept_errors, tls=tls)
            )  # fmt: skip
        log.info("EST on %s/.well-known/est (%d label(s))", self.est_server.url, len(labels))

    async def __aexit__(self, *exc: object) -> None:
        self._stopped.set()
        await self._stack.aclose()

    async def _stop_tasks(self) -> None:
        if self._lan is not None:
            self._lan.close()
        for task in [*self._lan_handlers, *self._serial_tasks.values()]:
            task.cancel()
        if self._lan_handlers:
            await asyncio.gather(*self._lan_handlers, return_exceptions=True)
        if self.lan_gate is not None:
            self.lan_gate.abort_all()
        if self._lan is not None:
            with contextlib.suppress(Exception):
                await self._lan.wait_closed()
        assert self._tg is not None
        if self._watcher is not None:
            self._watcher.cancel()
        await self._tg.__aexit__(None, None, None)

    # -- the registry ----------------------------------------------------------------------------------------------
    async def _watch_registry(self) -> None:
        """Re-read the registry every registry_poll_s. A failure raises the warning alarm stations.registry (one
        log line, with the traceback once per type and 5 minutes, not one per poll), cleared by the next read."""
        assert self.core is not None
        alarms, tracebacks = self.core.alarms, LogOnce(300.0)
        while True:
            await asyncio.sleep(self.config.stations.registry_poll_s)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - the watcher outlives any failure; it is alarmed and logged
                text = exc.message if isinstance(exc, BirthlineError) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, BirthlineError):
                    tracebacks.log(log, logging.ERROR, type(exc).__name__, "reading the station registry failed: %s",
                                   "".join(traceback.format_exception(exc)).rstrip())  # fmt: skip
                alarms.raise_alarm(
                    "stations.registry", f"reading the station registry failed (retried every"
                    f" {self.config.stations.registry_poll_s:g} s): {text}",
                    "added, disabled and rotated stations are not picked up meanwhile (those already known keep"
                    " working): check the journal's filesystem and the log",
                    severity="warning",
                )  # fmt: skip
            else:
                alarms.clear("stations.registry", "registry read")

    async def refresh(self) -> None:
        """Re-read the registry: start serial ports of new stations, drop disabled and rotated ones."""
        assert self.server is not None and self._tg is not None and self.core is not None
        records = {r.name: r for r in await alist_stations(self.core.journal)}
        old = self._stations
        self._stations = records
        self._by_fingerprint = {r.tls_fingerprint: r for r in records.values() if r.tls_fingerprint}
        for name in set(old) | set(records):
            now, before = records.get(name), old.get(name)
            if now is None or not now.enabled:
                code = Code.STATION_DISABLED
            elif before is not None and (now.key, now.tls_fingerprint) != (
                before.key,
                before.tls_fingerprint,
            ):
                code = Code.AUTH_FAILED
            else:
                continue
            if self.server.drop(name, code):
                log.warning("station %s: connections dropped (%s)", name, code.name)
        # A disabled station's port stays open: its HELLOs are answered STATION_DISABLED (the lookup), so its
        # fixture shows code 105 and stops instead of retrying into silence.
        wanted = {
            r.name: (r.port or "", r.baud or 115200, r.key)
            for r in records.values()
            if r.kind == "serial" and r.port
        }
        for name in list(self._serial_tasks):
            if self._serial_bound.get(name) != wanted.get(name):
                self._serial_tasks.pop(name).cancel()
                self._serial_bound.pop(name, None)
        for name, bound in wanted.items():
            if name not in self._serial_tasks:
                self._serial_bound[name] = bound
                self._serial_tasks[name] = self._tg.create_task(
                    self._serial_port(name, bound[0], bound[1]), name=f"serial {name} {bound[0]}"
                )

    def _lookup_for(self, bound: str) -> KeyLookup:
        """The key lookup of one port or TLS connection: only the station bound to it may authenticate."""

        def lookup(station_id: str) -> bytes | None:
            if station_id != bound:
                # The same answer whether or not that id is registered elsewhere: a peer on one port or with
                # one certificate learns nothing about which other station ids exist.
                raise StationError(Code.UNKNOWN_STATION, UNKNOWN_HERE)
            rec = self._stations.get(station_id)
            if rec is None:
                return None
            if not rec.enabled:
                raise StationError(Code.STATION_DISABLED, "station is disabled")
            return rec.key

        return lookup

    # -- transports -------------------------------------------------------------------------------------------------
    async def _serial_port(self, name: str, path: str, baud: int) -> None:
        from stations.transports.serial import SerialChannel

        assert self.server is not None
        cfg = self.config.stations
        missing_logged = False
        while True:
            try:
                channel = await SerialChannel.open(path, baud, pace=False, frame_timeout=cfg.frame_timeout_s)
            except (ChannelClosed, OSError, ValueError) as exc:
                if not missing_logged:
                    log.warning("station %s: port %s not available (%s); retrying", name, path, exc)
                    missing_logged = True
                await asyncio.sleep(cfg.reopen_interval_s)
                continue
            except Exception:
                log.exception("station %s: opening %s failed", name, path)
                await asyncio.sleep(cfg.reopen_interval_s)
                continue
            missing_logged = False
            log.info("station %s: port %s open at %d baud", name, path, baud)
            self._say_latency(name, path, channel, baud)
            try:
                await self.server.serve(channel, self._lookup_for(name), station=name, close_on_timeout=False)
            except Exception:
                log.exception("station %s: session loop on %s failed; reopening", name, path)
            log.info("station %s: port %s closed; reopening", name, path)
            await asyncio.sleep(cfg.reopen_interval_s)

    def _say_latency(self, name: str, path: str, channel: SerialChannel, baud: int) -> None:
        """Warn, once per port and value, about an adapter that holds received bytes back for more than 1 ms."""
        from stations.transports.serial import latency_advice

        ms = channel.usb_latency_ms
        if ms is None or ms <= 1:
            self._latency_said.pop(path, None)  # fixed: a later relapse is said again
            return
        if self._latency_said.get(path) == ms:
            return
        advice = latency_advice(name, path, ms, baud, channel.latency_timer_file)
        if advice is not None:
            log.warning("%s", advice)
            self._latency_said[path] = ms

    def _spawn_lan(self, guard: Guard, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A task of our own rather than the one asyncio makes of a coroutine callback: in Python 3.11 that
        # task's done-callback logs every handler cancelled at shutdown as an unhandled exception.
        task = asyncio.create_task(self._on_lan(guard, reader, writer), name=f"lan {guard.peer}")
        self._lan_handlers.add(task)

    async def _on_lan(self, guard: Guard, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self.server is not None
        self._lan_handlers.add(task)
        try:
            # Replies are drained after each write: a peer that stops reading blocks its own session here
            # instead of growing the TLS write buffer (asyncio's default allows 512 KiB).
            writer.transport.set_write_buffer_limits(high=LAN_WRITE_HIGH_WATER)
            channel = StreamChannel(
                reader, writer, decoder=FrameDecoder(frame_timeout=self.config.stations.frame_timeout_s)
            )
            ssl_obj = writer.get_extra_info("ssl_object")
            der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
            rec = self._by_fingerprint.get(hashlib.sha256(der).digest()) if der else None
            if rec is None or rec.kind != "lan" or not rec.enabled:
                self.refused_lan += 1
                code = Code.STATION_DISABLED if rec is not None else Code.UNKNOWN_STATION
                text = (
                    "station is disabled" if rec is not None else "TLS certificate of no registered station"
                )
                if rec is not None:
                    self.server.state(rec.name).counters["refused_station_disabled"] += 1
                # Counted like a failed handshake; with no station to bind it to, by the certificate itself (it
                # verified against the management CA, so there are only as many as that CA ever issued, however
                # many addresses present them): the alarms, the audit and the log stay bounded.
                key = (
                    rec.name if rec is not None else f"tls-cert:{hashlib.sha256(der or b'').hexdigest()[:16]}"
                )
                blocked = self.server.limiter.failed(key, self.server.clock()) or 0.0
                assert self.link_failures is not None
                self.link_failures.failed(station=key, peer=channel.peer, code=code.name, text=text,
                                          blocked_s=blocked)  # fmt: skip
                with contextlib.suppress(Exception):
                    await channel.send(plain_frame(Error(code, text)))
                await channel.close()
                return
            # A registered station's certificate: the listener no longer displaces this connection for
            # newcomers (appliance/connections.py), while its station session authenticates.
            guard.vouched(rec.name)
            await self.server.serve(
                channel, self._lookup_for(rec.name), station=rec.name, on_authenticated=guard.authenticated
            )
        except asyncio.CancelledError:
            # The daemon is stopping (serve() has said BYE BUSY): this handler ends normally, so nothing logs
            # a cancelled handler as an unhandled exception.
            pass
        except Exception:
            log.exception("LAN connection failed")
            with contextlib.suppress(Exception):
                writer.close()
        finally:
            self._lan_handlers.discard(task)


def run_daemon(config: Config) -> int:
    """`birthline run`: the daemon in the foreground until SIGTERM or SIGINT."""

    from appliance.sdnotify import Notifier
    from appliance.unitstatus import DaemonFigures, UnitReporter

    async def main() -> None:
        notifier = Notifier.from_environment()
        # What `systemctl status` shows while the HSM login, the journal and the listeners come up.
        notifier.send(STATUS="starting: HSM login, journal, listeners")
        async with Daemon(config) as daemon:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, daemon.stop)
            async with UnitReporter(
                notifier, DaemonFigures(daemon)
            ):  # READY=1 here, STOPPING=1 on the way out
                addr = daemon.lan_address
                limit, needed = daemon.fd_budget
                log.warning(
                    "birthline daemon running: %d station(s) registered, LAN %s; file descriptors: limit %d,"
                    " listener caps and reserve %d",
                    len(daemon._stations), f"{addr[0]}:{addr[1]}" if addr else "disabled", limit, needed,
                )  # fmt: skip
                await daemon.wait()
                log.warning("birthline daemon stopping")

    asyncio.run(main())
    return 0
