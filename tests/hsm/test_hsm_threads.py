from __future__ import annotations

import asyncio
import datetime
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hsm.errors import HsmTimeoutError
from hsm.keys import HsmEcPrivateKey, HsmPrivateKey
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from hsm.worker import Pkcs11Thread


def _cert(key: HsmPrivateKey, cn: str) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_builder_sign_from_another_thread(ec_key: HsmEcPrivateKey) -> None:
    result: list[x509.Certificate] = []
    worker = threading.Thread(target=lambda: result.append(_cert(ec_key, "from-thread")))
    worker.start()
    worker.join(timeout=30)
    assert len(result) == 1
    result[0].verify_directly_issued_by(result[0])


def test_concurrent_signing_is_serialised(ec_key: HsmEcPrivateKey) -> None:
    """4 threads x 50 signatures; without the single PKCS#11 thread SoftHSM segfaults here."""
    pub = ec_key.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)

    def worker(n: int) -> int:
        for i in range(50):
            data = f"{n}-{i}".encode()
            if i % 10 == 0:
                cert = _cert(ec_key, f"t{n}-{i}")
                cert.verify_directly_issued_by(cert)
            else:
                pub.verify(ec_key.sign(data, ec.ECDSA(hashes.SHA256())), data, ec.ECDSA(hashes.SHA256()))
        return n

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert sorted(pool.map(worker, range(4))) == [0, 1, 2, 3]


async def test_async_signing_does_not_block_the_loop(ec_key: HsmEcPrivateKey) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    sigs = await asyncio.gather(*(ec_key.asign_many([b"x"] * 20) for _ in range(10)))
    task.cancel()
    assert len(sigs) == 10
    assert ticks > 0


def test_pkcs11_calls_run_on_the_named_thread(hsm_token: Token) -> None:
    name = hsm_token.run(lambda _s: threading.current_thread().name)
    assert name == "pkcs11"
    assert hsm_token.thread.call(hsm_token.thread.on_thread)
    assert not hsm_token.thread.on_thread()


def test_second_open_shares_the_session(
    hsm_token: Token, softhsm_token: SoftHsmToken, ec_key: HsmEcPrivateKey
) -> None:
    second = Token.open(softhsm_token.hsm_config())
    try:
        assert second.thread is hsm_token.thread
        assert second.run(lambda s: s) is hsm_token.run(lambda s: s)
        again = second.get_key(ec_key.label)
        assert isinstance(again, HsmEcPrivateKey)
        assert again.sign(b"x", ec.ECDSA(hashes.SHA256()))
    finally:
        second.close()
    assert ec_key.sign(b"still works", ec.ECDSA(hashes.SHA256()))


async def test_async_context_manager(softhsm_token: SoftHsmToken, ec_key: HsmEcPrivateKey) -> None:
    async with Token.open(softhsm_token.hsm_config()) as token:
        key = token.get_key(ec_key.label)
        assert await key.asign_many([b"a"])
    assert ec_key.sign(b"after", ec.ECDSA(hashes.SHA256()))


def test_worker_timeout_and_close() -> None:
    worker = Pkcs11Thread(timeout_s=0.2, name="pkcs11-test")
    try:
        assert worker.call(lambda a, b: a + b, 2, b=3) == 5
        with pytest.raises(ZeroDivisionError):
            worker.call(lambda: 1 // 0)
        with pytest.raises(HsmTimeoutError) as info:
            worker.call(time.sleep, 1)
        assert info.value.retryable
    finally:
        worker.close()
    assert worker.closed


async def test_worker_acall_timeout() -> None:
    worker = Pkcs11Thread(timeout_s=0.2, name="pkcs11-test")
    try:
        assert await worker.acall(lambda: 7) == 7
        with pytest.raises(HsmTimeoutError):
            await worker.acall(time.sleep, 1)
    finally:
        worker.close()
