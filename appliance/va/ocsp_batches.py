"""The OCSP responder's fresh signatures, in batches: a request that needs one (a nonce, or a miss) queues; what
queued while the batches before it were at the HSM has its status read in one journal call and is signed in one
sign_many call per CA (which verifies each signature), with SIGN_BATCHES_IN_FLIGHT batches between their call and
their answers, so the HSM signs one while the answers of the other are verified.

A mixin of OcspResponder, whose state it uses (declared below): split from ocsp.py by responsibility.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from appliance.issuance.journal import Journal
from appliance.va.answers import Looked, OcspAnswer, Parsed, Signing, Waiting, answer_of, unsigned_response
from appliance.va.status import CertStatus

SIGN_BATCHES_IN_FLIGHT = 2


class BatchSigning:
    journal: Journal
    max_inflight_signs: int
    validity_s: float
    signed: int
    _signing: dict[str, Signing]

    if TYPE_CHECKING:  # OcspResponder's own; declared here for the type checker only

        def _lookup(self, p: Parsed) -> CertStatus: ...

    def _init_batches(self) -> None:
        # Answers waiting for a signature: signed together, one sign_many call per CA and turn (_drain).
        self._to_sign: list[Waiting] = []
        self._drainer: asyncio.Task[None] | None = None
        # Batches between their sign_many call and their answers: the HSM signs one while the answers of the
        # one before are verified (a thread, the GIL) instead of each waiting for the other.
        self._batches_in_flight = asyncio.Semaphore(SIGN_BATCHES_IN_FLIGHT)
        self._batch_tasks: set[asyncio.Task[None]] = set()

    async def _sign_batched(self, p: Parsed, now: float) -> tuple[OcspAnswer, CertStatus]:
        """Look up and sign in the next batch: what queued while the batches before were in the HSM, up to a
        batch's share of max_inflight_signs, has its status read in one journal call and goes in one sign_many
        call (which verifies each signature). The answer and the status it states. Raises what the lookup or
        signing raised (HsmBusyError, ...)."""
        future: asyncio.Future[tuple[OcspAnswer, CertStatus]] = asyncio.get_running_loop().create_future()
        self._to_sign.append((p, now, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="va-ocsp-sign")
        return await future

    async def _drain(self) -> None:
        while self._to_sign:
            await self._batches_in_flight.acquire()
            # What is queued by now (this task alone takes from the queue), up to an equal share of the signatures
            # allowed in flight, rounded up: a batch that took them all would leave nothing for the next one to
            # sign while it is verified, and the HSM would idle half the time. A request given up meanwhile (its
            # task cancelled) costs neither a lookup nor a signature.
            cap = -(-self.max_inflight_signs // SIGN_BATCHES_IN_FLIGHT)
            queued = [w for w in self._to_sign if not w[2].done()]
            batch, self._to_sign = queued[:cap], queued[cap:]
            if not batch:
                self._batches_in_flight.release()
                break
            task = asyncio.create_task(self._sign_batch(batch), name="va-ocsp-sign-batch")
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)

    async def _sign_batch(self, batch: list[Waiting]) -> None:
        """Sign one batch (one sign_many call per CA) and answer its requests; then free its place in flight."""
        try:
            await self._sign_by_ca(batch)
        finally:
            self._batches_in_flight.release()

    async def _sign_by_ca(self, batch: list[Waiting]) -> None:
        try:
            # One trip to the journal thread for the whole batch: one per request cost more of the event loop's
            # time (a thread hand-off and a future each way) than the lookup itself.
            statuses = await self.journal.acall(lambda: [self._lookup(p) for p, _, _ in batch])
        except Exception as exc:  # noqa: BLE001 - handed to each waiting request, which answers for it
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        by_ca: dict[str, list[Looked]] = {}
        for (p, now, future), status in zip(batch, statuses, strict=True):
            by_ca.setdefault(p.ca, []).append((p, status, now, future))
        for ca, items in by_ca.items():
            try:
                signing = self._signing[ca]
                built = [unsigned_response(signing, p, st, now, self.validity_s) for p, st, now, _ in items]
                # The key signs in the validation lane: behind every certificate the HSM has queued.
                signatures = await signing.key.asign_many([u.tbs for u, _, _ in built])
                self.signed += len(signatures)
                for (p, st, _, future), (u, this_update, next_update), sig in zip(
                    items, built, signatures, strict=True
                ):
                    if not future.done():
                        answer = answer_of(u.response(sig), p, st, this_update, next_update)
                        future.set_result((answer, st))
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request, which answers for it
                for *_, future in items:
                    if not future.done():
                        future.set_exception(exc)
