"""procpool.ProcessPool: the prepare workers' process pool (issue 15). Real child processes on real socket
pairs; the calls they run are in procpool_calls.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from appliance.issuance.procpool import ProcessPool, WorkerCallError
from tests.appliance.issuance import procpool_calls as calls

HANG_GUARD_S = 120.0  # a deadlock guard only, never a timing assertion


def _gone(pid: int) -> bool:
    """The process has exited and was reaped (no zombie left behind)."""
    return not Path(f"/proc/{pid}").exists()


async def _until(what: str, cond: object) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_calls_are_answered_by_initialized_workers_without_a_thread_in_between() -> None:
    threads = threading.active_count()
    pool = ProcessPool(2, calls.init, ("ctx",))
    try:
        await pool.start(HANG_GUARD_S)
        assert len(pool.pids) == 2 and os.getpid() not in pool.pids
        answers = await asyncio.gather(*(pool.submit(calls.echo, i) for i in range(40)))
        assert [a[0] for a in answers] == list(range(40))
        assert {a[1] for a in answers} == {"ctx"}  # each worker ran the initializer first
        assert {a[2] for a in answers} == set(pool.pids)  # both workers took calls
        big = b"x" * 3_000_000  # larger than any socket buffer: frames are reassembled
        ((echoed, _, _),) = await asyncio.gather(pool.submit(calls.echo, big))
        assert echoed == big
        assert threading.active_count() == threads
    finally:
        pool.shutdown()
    for pid in pool.pids:
        assert _gone(pid)


async def test_a_call_that_raises_is_that_calls_error_and_the_pool_goes_on() -> None:
    pool = ProcessPool(1, calls.init, ("ctx",))
    try:
        await pool.start(HANG_GUARD_S)
        with pytest.raises(WorkerCallError, match="ValueError: no such device"):
            await pool.submit(calls.fails, "no such device")
        with pytest.raises(WorkerCallError, match="does not pickle"):
            await pool.submit(calls.unpicklable)
        assert (await pool.submit(calls.echo, 7))[0] == 7
        assert not pool.broken
    finally:
        pool.shutdown()


async def test_a_worker_death_breaks_the_pool_for_every_call_and_ends_its_other_workers(
    tmp_path: Path,
) -> None:
    pool = ProcessPool(2, calls.init, ("ctx",))
    await pool.start(HANG_GUARD_S)
    held = [pool.submit(calls.block, str(tmp_path / "never")) for _ in range(2)]  # one in each worker
    os.kill(pool.pids[0], signal.SIGKILL)  # the OOM killer's way
    for future in held:
        with pytest.raises(BrokenProcessPool, match="killed by signal 9"):
            await future
    assert pool.broken
    with pytest.raises(BrokenProcessPool):
        pool.submit(calls.echo, 1)
    await _until("every worker of the broken pool reaped", lambda: all(_gone(p) for p in pool.pids))
    pool.shutdown()


async def test_a_worker_that_cannot_start_fails_start() -> None:
    pool = ProcessPool(1, calls.init_fails, ("no library",))
    with pytest.raises(BrokenProcessPool, match="exit code 1"):
        await pool.start(HANG_GUARD_S)
    pool.shutdown()
    await _until("reaped", lambda: all(_gone(p) for p in pool.pids))


async def test_shutdown_cancels_waiting_calls_and_stops_busy_workers(tmp_path: Path) -> None:
    pool = ProcessPool(1, calls.init, ("ctx",))
    await pool.start(HANG_GUARD_S)
    held = pool.submit(calls.block, str(tmp_path / "never"))
    await asyncio.sleep(0)
    pool.shutdown(wait=False)
    assert held.cancelled()
    await _until("the busy worker killed and reaped", lambda: all(_gone(p) for p in pool.pids))


async def test_workers_import_only_what_their_calls_need() -> None:
    """The memory point of this pool: a worker does not carry the daemon's modules."""
    import aiohttp  # noqa: F401 - the parent has it loaded; the worker must not inherit that

    pool = ProcessPool(1, calls.init, ("ctx",))
    try:
        await pool.start(HANG_GUARD_S)
        loaded = await pool.submit(calls.modules)
    finally:
        pool.shutdown()
    assert "tests.appliance.issuance.procpool_calls" in loaded
    assert not [m for m in loaded if m.split(".")[0] in {"aiohttp", "multiprocessing", "pytest"}]
    assert [m for m in loaded if m.startswith("appliance")] == [
        "appliance", "appliance.issuance", "appliance.issuance.procworker"
    ]  # fmt: skip


def test_workers_exit_when_their_daemon_is_killed(tmp_path: Path) -> None:
    """SIGKILL the process that owns the pool: the kernel closes its end of each socket and the workers exit."""
    pids = tmp_path / "pids"
    parent = textwrap.dedent(f"""
        import asyncio, pathlib, time
        from appliance.issuance.procpool import ProcessPool
        from tests.appliance.issuance import procpool_calls as calls
        async def main():
            pool = ProcessPool(2, calls.init, ("ctx",))
            await pool.start(120)
            pathlib.Path({str(pids)!r}).write_text(" ".join(map(str, pool.pids)))
            await asyncio.sleep(3600)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=Path(__file__).parents[3])
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not pids.exists() or not pids.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the pool never started"
            time.sleep(0.05)
        workers = [int(p) for p in pids.read_text().split()]
        proc.kill()
        proc.wait()
        while not all(not Path(f"/proc/{p}").exists() or "Z" in _state(p) for p in workers):
            assert time.monotonic() < deadline, "a worker outlived its daemon"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_worker_dying_while_the_pool_starts_stops_the_start_and_leaves_nothing_behind(
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
) -> None:
    """Spawning can be slow (memory pressure): here the second spawn waits until the first worker has died in its
    initializer. The start must then stop spawning, and nothing it started may outlive it (processes, sockets)."""
    from appliance.issuance import procpool

    fds = _fds()
    spawned: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def slow_popen(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        if spawned:
            spawned[0].wait(HANG_GUARD_S)  # the first worker is dead before the next one starts
        proc = real_popen(*args, **kwargs)  # type: ignore[call-overload]
        spawned.append(proc)
        return proc  # type: ignore[no-any-return]

    mocker.patch.object(procpool.subprocess, "Popen", slow_popen)
    pool = ProcessPool(4, calls.init_fails, ("no library",))
    with pytest.raises(BrokenProcessPool, match="exit code 1"):
        await pool.start(HANG_GUARD_S)
    assert len(spawned) == 2  # the third and fourth were never spawned into the dead pool
    pool.shutdown()
    await _until("every spawned worker reaped", lambda: all(_gone(p.pid) for p in spawned))
    await _until("no socket left open", lambda: _fds() <= fds)


async def test_a_worker_death_is_seen_even_when_a_descendant_holds_its_socket(tmp_path: Path) -> None:
    """A process forked by a worker keeps the worker's socket open after the worker dies: no end of file ever
    comes, and the pool watches the worker process itself."""
    pool = ProcessPool(1, calls.init, ("ctx",))
    await pool.start(HANG_GUARD_S)
    holder = await pool.submit(calls.fork_holder)
    try:
        held = pool.submit(calls.block, str(tmp_path / "never"))
        os.kill(pool.pids[0], signal.SIGKILL)
        with pytest.raises(BrokenProcessPool, match="killed by signal 9"):
            await asyncio.wait_for(held, HANG_GUARD_S)
        assert pool.broken
    finally:
        os.kill(holder, signal.SIGKILL)
        pool.shutdown()


async def test_a_call_that_does_not_pickle_fails_alone() -> None:
    pool = ProcessPool(1, calls.init, ("ctx",))
    try:
        await pool.start(HANG_GUARD_S)
        with pytest.raises(WorkerCallError, match="does not pickle"):
            await pool.submit(calls.echo, threading.Lock())
        assert not pool.broken and (await pool.submit(calls.echo, 1))[0] == 1
    finally:
        pool.shutdown()


async def test_a_worker_busy_at_shutdown_finishes_quietly(capfd: pytest.CaptureFixture[str]) -> None:
    """Its answer has nowhere to go: the worker exits without a traceback (no BrokenPipeError in the log)."""
    pool = ProcessPool(1, calls.init, ("ctx",))
    await pool.start(HANG_GUARD_S)
    busy = pool.submit(calls.sleep_then_echo, 0.5, "late")
    (pid,) = pool.pids
    await asyncio.sleep(
        0.1
    )  # the call reached the worker (if not, the worker exits at end of file: also fine)
    pool.shutdown(wait=True)
    assert busy.cancelled() and _gone(pid)
    assert "Traceback" not in capfd.readouterr().err


async def test_saturated_while_every_worker_has_an_unanswered_call(tmp_path: Path) -> None:
    """What finish_batch (appliance/issuance/finish.py) reads to share a batch with a thread of its own process."""
    pool = ProcessPool(2, calls.init, ("ctx",))
    try:
        await pool.start(HANG_GUARD_S)
        assert not pool.saturated
        first = pool.submit(calls.wait_for, str(tmp_path / "one"))
        assert not pool.saturated  # the other worker is idle: the next call goes there
        second = pool.submit(calls.wait_for, str(tmp_path / "two"))
        assert pool.saturated
        (tmp_path / "one").touch()
        assert await asyncio.wait_for(first, HANG_GUARD_S) == str(tmp_path / "one")
        assert not pool.saturated
        (tmp_path / "two").touch()
        await asyncio.wait_for(second, HANG_GUARD_S)
        assert not pool.saturated
    finally:
        pool.shutdown()
