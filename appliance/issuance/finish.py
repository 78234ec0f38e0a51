"""The last step before a certificate is released: each raw HSM signature encoded and verified with the CA key
over exactly its TBS bytes, then the certificate assembled (Preparer.finish). Where that runs: a thread of this
process for a small batch, the prepare workers for a larger one, and both at once when every worker is busy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from appliance.issuance.prepare import Preparer
from appliance.issuance.tbs import Tbs
from appliance.issuance.workers import PreparePool
from hsm.errors import SignatureVerificationError

# A batch of at most this many signatures is verified and assembled on a thread of this process rather than in
# a prepare worker: the round trip to a worker (~0.8 ms through the process pool's threads and pipes) costs ten
# times the verify (~70 us each), and at a line's usual pace batches are of one or two devices. Nothing a device
# sent is parsed here: the TBS is ours and the signature our HSM's.
FINISH_HERE_MAX = 4

# When every prepare worker is busy as a batch comes to be finished (issuance at full speed: the workers, which
# check two signatures a certificate, are the first limit), this share of the batch is checked and assembled on a
# thread here at the same time as the rest in the workers. cryptography releases the GIL while it verifies, so
# the thread uses the core the event loop leaves idle. As if this process were two thirds of one more worker:
# 2 / (3 W + 2), 0.4 of each batch with one worker. Measured on the 2-core reference machine: issuance 26.4% of
# the raw sign rate (median of seven runs) against 25.4% without (docs/performance.md). A worker with nothing
# queued gets the whole batch: the LAN front end, whose own event loop is its limit at ~1,200 certificates/s,
# keeps one worker about a quarter busy, so it rarely adds this work to that loop.
FINISH_HERE_WORKER_SHARE = 2 / 3


def share_here(batch: int, workers: int) -> int:
    """How many of a batch this process finishes itself while `workers` busy workers finish the rest."""
    share = FINISH_HERE_WORKER_SHARE / (workers + FINISH_HERE_WORKER_SHARE)
    return min(batch - 1, int(batch * share))


async def finish_batch(
    preparer: Preparer, pool: PreparePool | None, signed: Sequence[tuple[Tbs, bytes]], key_label: str
) -> list[bytes]:
    """The certificates of a signed batch, in order: in the prepare workers when there are some and the batch is
    larger than FINISH_HERE_MAX (the verify is the largest CPU cost left in this process), else on a thread (off
    the event loop); with every worker busy, a share of the batch on that thread at the same time
    (FINISH_HERE_WORKER_SHARE). SignatureVerificationError if any does not verify: then none of the batch is
    stored or released."""
    signed = list(signed)
    pool = pool if len(signed) > FINISH_HERE_MAX else None
    ders: list[bytes | None] | None = None
    if pool is not None:
        here = share_here(len(signed), pool.workers) if pool.saturated else 0
        if here:
            cut = len(signed) - here
            there, ours = await asyncio.gather(
                pool.finish(signed[:cut]), asyncio.to_thread(preparer.finish, signed[cut:])
            )
            if there is None:  # the workers could not: their part here too, not the whole batch again
                there = await asyncio.to_thread(preparer.finish, signed[:cut])
            ders = there + ours
        else:
            ders = await pool.finish(signed)
    if ders is None:
        ders = await asyncio.to_thread(preparer.finish, signed)
    checked = [d for d in ders if d is not None]
    if len(checked) != len(signed):
        raise SignatureVerificationError(
            f"the HSM returned a signature with key {key_label!r} that does not verify; not using it"
        )
    return checked
