"""OpenMetrics for the plant's monitoring (docs/metrics.md lists every metric), through prometheus-client.

The hot path only counts into plain dicts and histograms (appliance/control/stats.py); this module turns them
into metric families when the endpoint is scraped. Values that live in the journal (the upstream queue, the
revocations, which the CLI makes in another process) are read on the journal thread, before the families are
built, once per snapshot.

    GET /metrics     OpenMetrics 1.0 when the Accept header asks for application/openmetrics-text (Prometheus
                     does), else the Prometheus text format (curl, older scrapers; prometheus-client 0.26
                     labels it text/plain; version=1.0.0)

A scrape is answered from a snapshot at most SNAPSHOT_S old (one per format; concurrent scrapes share the one
being built), so however often the endpoint is asked, the journal is read and the text built at most once per
SNAPSHOT_S for each format. Each client address is paced to SCRAPE_RATE scrapes a second (bursts of
SCRAPE_BURST): a faster one waits, at most SCRAPE_MAX_DELAY_S, then gets 503 with Retry-After.

The listener is its own ([metrics] listen), with fixed bounds (METRICS_LIMITS).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from appliance.alarms import Alarms
from appliance.connections import HttpLimits
from appliance.control.events import EventBus
from appliance.control.stats import Histogram, Stats
from appliance.httplisten import gone, held
from appliance.issuance.journal import Journal
from appliance.issuance.pauses import StationPauses
from appliance.va.ratelimit import ClientLimiter

NAMESPACE = "birthline"

SNAPSHOT_S = 1.0  # the oldest a scrape's answer may be
SCRAPE_RATE = 5.0  # scrapes a second per client address (Prometheus scrapes every 15 s or so) ...
SCRAPE_BURST = 10  # ... in bursts of up to this many
SCRAPE_MAX_DELAY_S = 1.0  # the longest a scrape is held; one further over its rate gets 503
SCRAPE_CLIENTS = 1024  # addresses whose rate is tracked (appliance/va/ratelimit.py: newcomers then share one)
# The metrics listener's bounds, fixed: a few scrapers need a few connections.
METRICS_LIMITS = HttpLimits(
    max_connections=64, max_connections_per_peer=16, header_timeout_s=10.0, body_timeout_s=10.0,
    idle_timeout_s=30.0,
)  # fmt: skip

# name -> (connected, authenticated, peer), as the hub reads the station server
StationProbe = Callable[[], Mapping[str, tuple[bool, bool, str | None]]]


@dataclass
class QueueLoad:
    depth: int = 0
    oldest_age_s: float = 0.0


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets, total = h.snapshot()
    return HistogramMetricFamily(f"{NAMESPACE}_{name}", doc, buckets=buckets, sum_value=total)


class ApplianceCollector(Collector):
    def __init__(
        self,
        stats: Stats,
        alarms: Alarms,
        bus: EventBus,
        pauses: StationPauses,
        stations: StationProbe,
        upstream_enabled: bool,
    ) -> None:
        self.stats = stats
        self.alarms = alarms
        self.bus = bus
        self.pauses = pauses
        self.stations = stations
        self.upstream_enabled = upstream_enabled
        self.queue = QueueLoad()
        self.revoked: dict[str, int] = {}  # revoked certificates by RFC 5280 reason, from the journal

    def collect(self) -> Iterable[Metric]:
        s = self.stats
        issued = CounterMetricFamily(f"{NAMESPACE}_issued", "Certificates issued (signed and stored), by station"
                                     " and product", labels=["station", "product"])  # fmt: skip
        for (station, product), n in sorted(s.issued.items()):
            issued.add_metric([station, product], n)
        yield issued
        reused = CounterMetricFamily(f"{NAMESPACE}_reused", "Requests answered with the certificate stored for an"
                                     " earlier request of the same device and key (retries)",
                                     labels=["station", "product"])  # fmt: skip
        for (station, product), n in sorted(s.reused.items()):
            reused.add_metric([station, product], n)
        yield reused
        pending = CounterMetricFamily(f"{NAMESPACE}_pending", "RA mode: requests authorised and queued for the"
                                      " upstream CA", labels=["station", "product"])  # fmt: skip
        for (station, product), n in sorted(s.pending.items()):
            pending.add_metric([station, product], n)
        yield pending
        refused = CounterMetricFamily(f"{NAMESPACE}_refused", "Requests refused or failed, by reason code, station"
                                      " and product (empty: refused before a work order was chosen)",
                                      labels=["station", "product", "reason"])  # fmt: skip
        for (station, product, reason), n in sorted(s.refused.items()):
            refused.add_metric([station, product, reason], n)
        yield refused
        confirmed = CounterMetricFamily(f"{NAMESPACE}_confirmed", "Certificates a station confirmed it stored",
                                        labels=["station"])  # fmt: skip
        for station, n in sorted(s.confirmed.items()):
            confirmed.add_metric([station], n)
        yield confirmed
        yield _histogram("confirmation_lag_seconds", "Time from a certificate's issuance to its station's"
                         " confirmation", s.confirmation_lag)  # fmt: skip
        yield _histogram("hsm_sign_seconds", "Duration of one HSM signing call (a batch of certificates)",
                         s.sign_seconds)  # fmt: skip
        yield CounterMetricFamily(f"{NAMESPACE}_hsm_signatures", "Certificate signatures asked of the HSM",
                                  value=s.signed_certificates)  # fmt: skip
        yield _histogram("journal_commit_seconds", "Duration of one journal COMMIT from BEGIN IMMEDIATE"
                         " (fsync included); transactions queued together share one (group commit)", s.commit_seconds)  # fmt: skip
        yield GaugeMetricFamily(f"{NAMESPACE}_upstream_enabled", "1 when an upstream CA is configured",
                                value=int(self.upstream_enabled))  # fmt: skip
        yield GaugeMetricFamily(f"{NAMESPACE}_upstream_queue_depth", "Records queued for the upstream CA"
                                " (queued, sent or waiting)", value=self.queue.depth)  # fmt: skip
        yield GaugeMetricFamily(f"{NAMESPACE}_upstream_queue_oldest_age_seconds", "Age of the oldest record"
                                " queued for the upstream CA (0: none)", value=self.queue.oldest_age_s)  # fmt: skip
        revoked = GaugeMetricFamily(f"{NAMESPACE}_revoked_certificates", "Certificates revoked (every source:"
                                    " revoke, scrap, rework, CMP), by reason", labels=["reason"])  # fmt: skip
        for reason, n in sorted(self.revoked.items()):
            revoked.add_metric([reason], n)
        yield revoked
        active = self.alarms.active()
        by_severity = GaugeMetricFamily(f"{NAMESPACE}_alarms_active", "Open alarms by severity",
                                        labels=["severity"])  # fmt: skip
        for severity in ("critical", "warning"):
            by_severity.add_metric([severity], sum(1 for a in active if a.severity == severity))
        yield by_severity
        each = GaugeMetricFamily(f"{NAMESPACE}_alarm", "1 for each open alarm, by cause",
                                 labels=["cause", "severity", "acknowledged"])  # fmt: skip
        for a in active:
            each.add_metric([a.cause, a.severity, "true" if a.acknowledged_by else "false"], 1)
        yield each
        stations = self.stations()
        connected = GaugeMetricFamily(f"{NAMESPACE}_station_connected", "1 while a station has a connection"
                                      " (TLS) or its port open (serial)", labels=["station"])  # fmt: skip
        for name, (up, _auth, _peer) in sorted(stations.items()):
            connected.add_metric([name], int(up))
        yield connected
        paused = GaugeMetricFamily(f"{NAMESPACE}_station_paused", "1 for each station an operator paused",
                                   labels=["station"])  # fmt: skip
        for name in sorted(self.pauses.all()):
            paused.add_metric([name], 1)
        yield paused
        yield GaugeMetricFamily(f"{NAMESPACE}_control_event_streams", "Open control API event streams",
                                value=self.bus.subscribers)  # fmt: skip
        yield CounterMetricFamily(f"{NAMESPACE}_control_event_streams_dropped", "Event streams ended because"
                                  " their reader fell behind", value=self.bus.dropped_subscribers)  # fmt: skip


class Metrics:
    """The registry, its snapshots and the /metrics handler."""

    def __init__(
        self, collector: ApplianceCollector, journal: Journal, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.collector = collector
        self.journal = journal
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.registry.register(ProcessCollector(namespace=NAMESPACE, registry=None))
        self.renders = 0  # snapshots built (the journal read and the text generated)
        self._snapshots: dict[bool, tuple[float, bytes, str]] = {}  # openmetrics? -> (built at, body, type)
        self._lock = asyncio.Lock()
        self._pace = ClientLimiter(SCRAPE_RATE, SCRAPE_BURST, SCRAPE_CLIENTS)

    def _queue(self) -> QueueLoad:
        row = self.journal.conn.execute(
            "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE state IN ('queued', 'sent', 'waiting')"
        ).fetchone()
        oldest = row[1]
        return QueueLoad(int(row[0]), 0.0 if oldest is None else max(0.0, time.time() - float(oldest)))

    def _revoked(self) -> dict[str, int]:
        rows = self.journal.conn.execute("SELECT reason, COUNT(*) FROM revocation GROUP BY reason").fetchall()
        return {str(reason): int(n) for reason, n in rows}

    async def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition for an Accept header: the snapshot if it is at most SNAPSHOT_S old, else a new one."""
        om = "application/openmetrics-text" in accept
        async with self._lock:  # a scrape arriving while a snapshot is built waits for it
            snap = self._snapshots.get(om)
            if snap is not None and self.clock() - snap[0] < SNAPSHOT_S:
                return snap[1], snap[2]
            built = self.clock()
            self.collector.queue = await self.journal.acall(self._queue)
            self.collector.revoked = await self.journal.acall(self._revoked)
            if om:
                body = openmetrics.generate_latest(self.registry)  # type: ignore[no-untyped-call]
                content_type = openmetrics.CONTENT_TYPE_LATEST
            else:
                body, content_type = exposition.generate_latest(self.registry), exposition.CONTENT_TYPE_LATEST
            self.renders += 1
            self._snapshots[om] = (built, body, content_type)
            return body, content_type

    async def handle(self, request: web.Request) -> web.Response:
        delay = self._pace.reserve(request.remote, SCRAPE_MAX_DELAY_S)
        if delay is None or delay > 0:
            with held(request):  # the connection is displaceable while its scrape waits
                await asyncio.sleep(SCRAPE_MAX_DELAY_S if delay is None else delay)
            if gone(request):
                return web.Response(status=400)  # never sent: the connection is closed
        if delay is None:
            return web.Response(
                status=503, text="too many scrapes from this address: retry\n",
                headers={"Retry-After": "1", "Cache-Control": "no-store"},
            )  # fmt: skip
        body, content_type = await self.render(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024)
        app.router.add_get("/metrics", self.handle)
        return app
