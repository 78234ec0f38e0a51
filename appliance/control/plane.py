"""The control plane of a running daemon: the hub that observes issuance, the control API on its Unix socket,
the metrics listener and the disk-space alarm, composed from the core and started with the daemon."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from appliance.bind import binding
from appliance.connections import AcceptErrors
from appliance.control.actions import Actions
from appliance.control.events import EventBus
from appliance.control.hub import ControlHub
from appliance.control.metrics import METRICS_LIMITS, ApplianceCollector, Metrics
from appliance.control.server import ControlApi, ControlServer
from appliance.control.sessions import Sessions
from appliance.control.status import StatusBuilder, StatusSources
from appliance.diskspace import DiskWatch
from appliance.issuance.service import IssueService
from appliance.runtime import Core
from appliance.va.http import VaServer

log = logging.getLogger(__name__)

# What the plane reads of the station server (stations/server.py, which knows nothing of the appliance).
Probe = Callable[[], Mapping[str, tuple[bool, bool, str | None]]]
Snapshots = Callable[[], Mapping[str, Mapping[str, Any]]]


class ControlPlane:
    def __init__(
        self,
        core: Core,
        service: IssueService,
        *,
        probe: Probe,
        snapshots: Snapshots,
        on_revoked: Callable[[], None] | None = None,
        accept_errors: AcceptErrors | None = None,
        cmp: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> None:
        self.core = core
        self.accept_errors = accept_errors
        self.cmp = cmp
        self.service = service
        self.probe = probe
        self.snapshots = snapshots
        self.on_revoked = on_revoked
        cfg = core.config.control
        self.hub = ControlHub(core.alarms, EventBus(cfg.subscriber_queue, cfg.max_subscribers))
        self.sessions = Sessions(cfg.session_ttl_s, cfg.max_sessions)
        self.server: ControlServer | None = None
        self.metrics: Metrics | None = None
        self.metrics_server: VaServer | None = None
        self._stack = contextlib.AsyncExitStack()

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_server is None else f"{self.metrics_server.url}/metrics"

    async def __aenter__(self) -> ControlPlane:
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _start(self) -> None:
        core, cfg = self.core, self.core.config
        await self._stack.enter_async_context(self.hub)
        self.service.observer = self.hub
        core.journal.commit_observer = self.hub.journal_committed
        self.hub.watch_stations(self.probe)
        await self._stack.enter_async_context(
            DiskWatch(cfg.appliance.state_dir, core.alarms, cfg.control.disk_low_mb, cfg.control.disk_check_s)
        )
        if cfg.control.enabled:
            actions = Actions(core.journal, core.audit, core.alarms, self.service.pauses, self.hub.bus, self.sessions,
                              cfg.issuance.issuing_ca, self.on_revoked)  # fmt: skip
            status = StatusBuilder(StatusSources(cfg, core.journal, self.hub, core.alarms, self.service.pauses,
                                                 self.sessions, self.snapshots, self.cmp))  # fmt: skip
            api = ControlApi(cfg.control, self.hub, status, self.sessions, actions)
            self.server = await self._stack.enter_async_context(
                ControlServer(api, cfg.control_socket, cfg.control)
            )
        if cfg.metrics.address is not None:
            collector = ApplianceCollector(self.hub.stats, core.alarms, self.hub.bus, self.service.pauses, self.probe,
                                           cfg.upstream.enabled)  # fmt: skip
            self.metrics = Metrics(collector, core.journal)
            with binding("[metrics] listen", cfg.metrics.listen):
                self.metrics_server = await self._stack.enter_async_context(
                    VaServer(
                        self.metrics.app(), *cfg.metrics.address, limits=METRICS_LIMITS, name="metrics",
                        alarms=core.alarms, accept_errors=self.accept_errors,
                    )
                )  # fmt: skip
            log.info("metrics on %s", self.metrics_url)

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._stack.aclose()
        finally:
            self.service.observer = None
            self.core.journal.commit_observer = None
