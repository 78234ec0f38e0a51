"""What an unauthenticated peer can make a front end (CMP, SCEP) do: bounded per peer and in total, before the
work.

Every request a network peer sends takes one unit from that peer's budget (`check_rate_per_client`, bursts of
`check_burst_per_client`) and from the budget of all peers together (`check_rate_total`, bursts of
`check_burst_total`) *before anything is done for it*, once its body is in (appliance/cmp/server.py,
appliance/scep/server.py: a body still arriving costs only its connection, which the listener bounds): before it
is parsed, its MAC derived or its signature and signer verified, its envelope decrypted in the HSM, and before an
error answer is built and protected. The unit is given back as soon as the request has authenticated (CMP: its
protection verified and its signer trusted, appliance/cmp/responder.py; SCEP: its challenge password claimed, a
renewal's signer found to be a current certificate of this appliance, a CertPoll signed by the key that made the
request, appliance/scep/responder.py):
so the budgets count the work peers cause that proves nothing, and a client that holds a credential - a device,
a station, a downstream RA draining hundreds of records a second - is never held back by its own traffic.

A request within its budgets is admitted at once; over them, it is held until it is within (pacing: a peer that
sends as fast as it is answered slows itself down); one further over them than `pace_max_delay_s` is held that
long all the same and then answered HTTP 503 with Retry-After, having cost nothing else. A client that
authenticated within the last `known_client_s` seconds does not spend the shared budget, only its own, so a flood
from many addresses does not lock out the clients the appliance already knows.

At most `checks_in_flight` protection checks (MAC derivations, signature verifications, HSM decryptions) run at
once, whoever asked for them; the rest wait their turn in the responder.

One Admission per front end, each with its own budgets and its own config section (`section`: [cmp], [scep]):
a flood of one protocol does not spend the other's budget.

A client is its IP address (an IPv6 client its /64: appliance/va/ratelimit.py); the tables are bounded
(`clients_max`). Peers behind one NAT or proxy share one budget.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from appliance.alarms import LogOnce
from appliance.va.ratelimit import ClientLimiter, Rate, client_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdmissionLimits:
    check_rate_per_client: float = 5.0
    check_burst_per_client: int = 32
    check_rate_total: float = 20.0
    check_burst_total: int = 64
    pace_max_delay_s: float = 1.0
    checks_in_flight: int = 2
    clients_max: int = 4096
    known_client_s: float = 600.0


class Busy(Exception):
    """The peer is over its budget, or all peers together are: answer HTTP 503 with Retry-After, do nothing."""

    def __init__(self, retry_after_s: int, scope: str) -> None:
        super().__init__(f"over the {scope} budget; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s
        self.scope = scope


@dataclass
class Ticket:
    """One admitted request: what it took from the budgets, given back if it authenticates."""

    peer: str  # the client: an IPv4 address, an IPv6 /64
    remote: str | None  # the address it came from
    shared: bool
    returned: bool = False


class Admission:
    """See the module docstring. The event loop owns it (not thread-safe)."""

    def __init__(
        self,
        limits: AdmissionLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        section: str = "cmp",
    ) -> None:
        self.limits = lim = limits or AdmissionLimits()
        self.section = section  # the front end's config section, which names it in the log
        self.clock = clock
        self._clients = ClientLimiter(lim.check_rate_per_client, lim.check_burst_per_client, lim.clients_max,
                                      clock=clock)  # fmt: skip
        self._total = Rate(lim.check_rate_total, lim.check_burst_total, clock())
        self._known: OrderedDict[str, float] = OrderedDict()  # client -> when it last authenticated
        self._slots: asyncio.Semaphore | None = None
        self._log = LogOnce(interval_s=60.0, clock=clock)
        self.admitted = 0  # requests let in
        self.paced = 0  # ... after being held until within their budgets
        self.busy_client = 0  # held pace_max_delay_s, then 503: the peer far over its own budget
        self.busy_total = 0  # ... all peers together far over theirs
        self.given_back = 0  # units given back: the request authenticated

    def _is_known(self, peer: str, now: float) -> bool:
        seen = self._known.get(peer)
        if seen is None:
            return False
        if now - seen > self.limits.known_client_s:
            del self._known[peer]
            return False
        return True

    async def admit(self, remote: str | None, *, holding: Callable[[bool], None] | None = None) -> Ticket:
        """Admit one request from `remote` (the TCP peer's address), pacing it to its budgets; Busy when it
        is further over them than pace_max_delay_s (after holding it that long). `holding(True)` is called
        before the request is held and `holding(False)` once it is admitted (the HTTP side lets the listener
        displace a held request's connection meanwhile)."""
        lim = self.limits
        peer = client_key(remote)
        now = self.clock()
        delay = self._clients.reserve(remote, lim.pace_max_delay_s)
        if delay is None:
            self.busy_client += 1
            retry = self._clients.wait(remote) - lim.pace_max_delay_s
            self._log.log(log, logging.WARNING, f"{self.section}.busy.client",
                          "%s: requests from %s that did not authenticate exceed its budget ([%s]"
                          " check_rate_per_client %g/s, bursts of %d): answered 503 without being parsed",
                          self.section.upper(), peer, self.section, lim.check_rate_per_client,
                          lim.check_burst_per_client)  # fmt: skip
            await self._hold(lim.pace_max_delay_s, holding)
            raise Busy(_seconds(retry), "client")
        shared = not self._is_known(peer, now)
        if shared:
            total_delay = self._total.reserve(now, lim.pace_max_delay_s)
            if total_delay is None:
                self._clients.refund(remote)
                self.busy_total += 1
                retry = self._total.wait(now) - lim.pace_max_delay_s
                self._log.log(log, logging.WARNING, f"{self.section}.busy.total",
                              "%s: requests that did not authenticate, from all peers together, exceed the"
                              " shared budget ([%s] check_rate_total %g/s, bursts of %d): new peers answered"
                              " 503 without being parsed (the last: %s)", self.section.upper(), self.section,
                              lim.check_rate_total, lim.check_burst_total, peer)  # fmt: skip
                await self._hold(lim.pace_max_delay_s, holding)
                raise Busy(_seconds(retry), "total")
            delay = max(delay, total_delay)
        if delay > 0:
            self.paced += 1
            await self._hold(delay, holding)
            if holding is not None:
                holding(False)
        self.admitted += 1
        return Ticket(peer, remote, shared)

    @staticmethod
    async def _hold(seconds: float, holding: Callable[[bool], None] | None) -> None:
        if holding is not None:
            holding(True)
        await asyncio.sleep(seconds)

    def authenticated(self, ticket: Ticket | None) -> None:
        """The request proved its sender holds a credential: what it took is given back, and its client spends
        no shared budget for known_client_s."""
        if ticket is None or ticket.returned:
            return
        ticket.returned = True
        self.given_back += 1
        self._clients.refund(ticket.remote)
        if ticket.shared:
            self._total.refund()
        self._known[ticket.peer] = self.clock()
        self._known.move_to_end(ticket.peer)
        while len(self._known) > self.limits.clients_max:
            self._known.popitem(last=False)

    def slots(self) -> asyncio.Semaphore:
        """The protection checks (MAC derivations, signature verifications, HSM decryptions) allowed to run at
        once."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.checks_in_flight)
        return self._slots

    @property
    def stats(self) -> dict[str, int]:
        return {"admitted": self.admitted, "paced": self.paced, "busy_client": self.busy_client,
                "busy_total": self.busy_total, "authenticated": self.given_back}  # fmt: skip


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))
