"""The OCSP responder's answers kept: the cache of answers without a nonce (by CA, serial and CertID hash, fresh for
half their validity), the index of the request bytes each was asked with (fast()), the answers made ahead of time
(presign()), and what drops them: a change to a certificate's issuance or revocation row, read from the journal
(refresh()), or a new signer for its CA.

A mixin of OcspResponder, whose state it uses (declared below): split from ocsp.py by responsibility.
"""

from __future__ import annotations

from collections.abc import Callable

from appliance.issuance.journal import Journal
from appliance.va.answers import (
    CERTID_HASHES,
    Entry,
    OcspAnswer,
    Parsed,
    Signing,
    answer_of,
    unsigned_response,
)
from appliance.va.presign import plain_request
from appliance.va.status import CertStatus, live_statuses


class AnswerCache:
    journal: Journal
    clock: Callable[[], float]
    validity_s: float
    cache_max: int
    presign_max: int
    presign_batch: int
    hits: int
    signed: int
    presigned: int
    _issuers: dict[tuple[str, bytes, bytes], str]
    _signing: dict[str, Signing]
    _cache: dict[tuple[str, int, str], Entry]
    _by_request: dict[bytes, Entry]
    _changed: set[tuple[str, int]]
    _presigning: bool
    _generation: int
    _seen_revocation: int
    _seen_issuance: int

    def _hit(self, key: tuple[str, int, str], now: float) -> OcspAnswer | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if now >= entry.fresh_until:
            self._cache.pop(key, None)
            entry.dead = True
            return None
        self.hits += 1
        return entry.answer

    def _store(self, p: Parsed, status: CertStatus, answer: OcspAnswer, generation: int) -> Entry | None:
        if p.nonce is not None or not status.cacheable or generation != self._generation:
            return None
        return self._put(p.key, answer)

    def _put(self, key: tuple[str, int, str], answer: OcspAnswer) -> Entry:
        if len(self._cache) >= self.cache_max:
            for old in list(self._cache)[: max(1, self.cache_max // 10)]:
                self._cache.pop(old).dead = True
        assert answer.produced_at is not None
        if (previous := self._cache.get(key)) is not None:
            previous.dead = True
        entry = self._cache[key] = Entry(answer, answer.produced_at + self.validity_s / 2)
        return entry

    def _index(self, request_der: bytes, entry: Entry) -> None:
        if len(self._by_request) >= self.cache_max:
            for old in list(self._by_request)[: max(1, self.cache_max // 10)]:
                del self._by_request[old]
        self._by_request[request_der] = entry

    def fast(self, request_der: bytes) -> OcspAnswer | None:
        """The answer for a request whose exact bytes were answered from the cache before, or that asks in the
        plain encoding for a pre-produced answer: one dict lookup, no parsing, no journal, no HSM. None: use
        aanswer. Only answers without a nonce are found here (a nonce makes every request's bytes new)."""
        entry = self._by_request.get(request_der)
        if entry is None:
            return None
        if entry.dead or self.clock() >= entry.fresh_until:
            del self._by_request[request_der]
            return None
        self.hits += 1
        return entry.answer

    # -- answers made ahead of time ----------------------------------------------------------------------------
    def _certid_hashes(self, ca: str) -> tuple[bytes, bytes] | None:
        for (alg, name_hash, key_hash), name in self._issuers.items():
            if name == ca and alg == "sha1":
                return name_hash, key_hash
        return None

    async def presign(self) -> int:
        """Answer ahead of time, as large responders do: sign (SHA-1 CertID, no nonce, the form RFC 5019
        clients and openssl send) answers for the `presign_max` newest live certificates of each CA that have
        none in the cache, or whose answer is past a quarter of its validity, in batches of `presign_batch`
        answers per HSM call (validation lane, behind certificates). A warm request then costs a lookup.

        A certificate whose issuance or revocation row changes while its batch is signed (seen by refresh())
        is not stored: its next answer is made from the journal as it is then. Returns answers stored."""
        self._changed.clear()
        self._presigning = True
        try:
            return await self._presign_pass()
        finally:
            self._presigning = False
            self._changed.clear()

    async def _presign_pass(self) -> int:
        stored = 0
        for ca, signing in list(self._signing.items()):
            ids = self._certid_hashes(ca)
            if ids is None:
                continue
            name_hash, key_hash = ids
            rows = await self.journal.acall(live_statuses, self.journal.conn, ca, self.presign_max)
            now = self.clock()
            due = [
                (serial, status) for serial, status in rows
                if (e := self._cache.get((ca, serial, "sha1"))) is None or e.fresh_until - now < self.validity_s / 4
            ]  # fmt: skip
            for start in range(0, len(due), self.presign_batch):
                chunk = due[start : start + self.presign_batch]
                parsed = [Parsed(ca, CERTID_HASHES[0], name_hash, key_hash, s, None) for s, _ in chunk]
                built = [
                    unsigned_response(signing, p, st, now, self.validity_s)
                    for p, (_, st) in zip(parsed, chunk, strict=True)
                ]
                signatures = await signing.key.asign_many([u.tbs for u, _, _ in built])
                self.signed += len(signatures)
                self.presigned += len(signatures)
                # A long pass must not hold back revocations: the poll's refresh also runs between batches,
                # so what it drops (and the _changed check below) is never more than a batch late.
                await self.arefresh()
                if self._signing.get(ca) is not signing:
                    break  # a new signer took over meanwhile: its answers are made on demand / next pass
                for p, (_, status), (u, this_update, next_update), sig in zip(
                    parsed, chunk, built, signatures, strict=True
                ):
                    if (ca, p.serial) in self._changed:
                        continue
                    answer = answer_of(u.response(sig), p, status, this_update, next_update)
                    entry = self._put(p.key, answer)
                    self._index(plain_request("sha1", name_hash, key_hash, p.serial), entry)
                    stored += 1
        return stored

    # -- invalidation ----------------------------------------------------------------------------------------
    def _watermarks(self) -> tuple[int, int]:
        conn = self.journal.conn
        rev = conn.execute("SELECT COALESCE(MAX(change_seq), 0) FROM revocation").fetchone()[0]
        iss = conn.execute("SELECT COALESCE(MAX(id), 0) FROM issuance").fetchone()[0]
        return int(rev), int(iss)

    def _changes(self) -> tuple[int, int, list[tuple[str, str]]]:
        conn = self.journal.conn
        changed: list[tuple[str, str]] = []
        rev, iss = self._seen_revocation, self._seen_issuance
        for seq, ca, serial in conn.execute(
            "SELECT change_seq, ca, cert_serial FROM revocation WHERE change_seq > ? ORDER BY change_seq",
            (rev,),
        ):
            rev = max(rev, int(seq))
            changed.append((str(ca), str(serial)))
        for row_id, ca, serial in conn.execute(
            "SELECT id, ca, cert_serial FROM issuance WHERE id > ? ORDER BY id", (iss,)
        ):
            iss = max(iss, int(row_id))
            changed.append((str(ca), str(serial)))
        return rev, iss, changed

    def _apply(self, changes: tuple[int, int, list[tuple[str, str]]]) -> int:
        rev, iss, changed = changes
        self._seen_revocation, self._seen_issuance = rev, iss
        if changed:
            self._generation += 1
        dropped = 0
        for ca, serial in changed:
            number = int(serial, 16)
            if self._presigning:
                self._changed.add((ca, number))
            for alg in CERTID_HASHES:
                if (entry := self._cache.pop((ca, number, alg.name), None)) is not None:
                    entry.dead = True
                    dropped += 1
        return dropped

    def refresh(self) -> int:
        """Forget cached answers whose certificate's revocation or issuance row changed; returns how many."""
        return self._apply(self.journal.call(self._changes))

    async def arefresh(self) -> int:
        return self._apply(await self.journal.acall(self._changes))

    def _forget_ca(self, ca: str) -> None:
        self._generation += 1
        for key in [k for k in self._cache if k[0] == ca]:
            self._cache.pop(key).dead = True
