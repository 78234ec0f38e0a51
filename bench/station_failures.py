"""A station link under attack: what failed handshakes and forged frames cost the appliance.

    python bench/station_failures.py [--seconds 10] [--good 2]

`birthline run` in its own process with four kinds of LAN station: `--good` fixtures enrolling and confirming
devices as fast as they can, one with the wrong station key that handshakes again and again, one that
authenticates and then sends frames with a forged tag, and one that replays a recorded frame. First the good
fixtures run alone for `--seconds`, then with the three attackers beside them for as long. Printed: the
attackers' attempts and the answers they got, the audit entries and the daemon's log lines the flood caused,
and the good fixtures' certificates/s without and with the flood.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.audit.log import AuditLog
from appliance.runtime import open_core
from bench.stations import _config, _free_port, _setup, _wait_listening
from stations.client import StationClient, client_ssl_context, generate_device_key, make_csr
from stations.codec import DecodeEvent
from stations.messages import Error, Ping
from stations.session import Authenticated, Closed, HandshakeFailed, Received, SessionEvent, StationSession
from stations.transports.base import ChannelClosed
from stations.transports.stream import StreamChannel


async def _good(sim_key: bytes, name: str, port: int, bundle: Path, until: float, prefix: str) -> int:
    ctx = client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt")
    client = await StationClient.connect_tcp("127.0.0.1", port, station_id=name, key=sim_key, ssl_context=ctx,
                                             server_hostname="localhost", give_up_after=60)  # fmt: skip
    done, tag = 0, secrets.token_hex(4)  # serials of the shape the bench's work order allows
    try:
        while time.monotonic() < until:
            serial = f"{prefix}-{tag}-{done:06d}"
            chain = await client.enroll(serial, make_csr(generate_device_key(), serial))
            assert client.last_request_id is not None
            await client.confirm(client.last_request_id, chain[0])
            done += 1
    finally:
        await client.close()
    return done


async def _events(channel: StreamChannel, session: StationSession) -> list[SessionEvent]:
    async with asyncio.timeout(30):
        while True:
            item = await channel.recv()
            if isinstance(item, DecodeEvent):
                continue
            step = session.receive(item)
            for wire in step.send:
                await channel.send(wire)
            if step.events:
                return list(step.events)


async def _attacker(
    kind: str, name: str, key: bytes, port: int, bundle: Path, until: float
) -> collections.Counter[str]:
    """wrong-key: HELLO and AUTH with the wrong key, over and over. forge: authenticate, then frames whose tag
    does not verify. replay: authenticate, then one recorded frame again and again. Every answer is counted."""
    ctx = client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt")
    answers: collections.Counter[str] = collections.Counter()
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
            )
        except OSError:
            answers["refused connection"] += 1
            continue
        channel = StreamChannel(reader, writer)
        session = StationSession(name, bytes(32) if kind == "wrong-key" else key)
        try:
            while time.monotonic() < until:
                if not session.established:
                    await channel.send(session.hello())
                    event = next(e for e in await _events(channel, session)
                                 if isinstance(e, Authenticated | HandshakeFailed | Closed))  # fmt: skip
                    if isinstance(event, HandshakeFailed):
                        answers[f"handshake {getattr(event.code, 'name', event.code)}"] += 1
                        continue
                    recorded = session.send(Ping(0))
                    await channel.send(recorded)
                    await _events(channel, session)
                if kind == "forge":
                    wire = bytearray(session.send(Ping(1)))
                    wire[-5] ^= 0x01
                    body = bytes(wire[:-4])
                    await channel.send(body + zlib.crc32(body).to_bytes(4, "big"))
                else:
                    await channel.send(recorded)
                for reply in await _events(channel, session):
                    if isinstance(reply, Received) and isinstance(reply.message, Error):
                        answers[f"frame {getattr(reply.message.code, 'name', reply.message.code)}"] += 1
                    elif isinstance(reply, Closed):
                        answers[f"BYE {getattr(reply.code, 'name', reply.code)}"] += 1
        except (ChannelClosed, TimeoutError, OSError):
            answers["connection closed by the appliance"] += 1
        finally:
            await channel.close()
    return answers


async def bench(seconds: float, good: int, show_log: bool = False) -> None:
    with tempfile.TemporaryDirectory(prefix="birthline-bench-") as tmp:
        base = Path(tmp)
        port = _free_port()
        config = _config(base, port)
        sims = _setup(config, base, 0, good + 3)
        names = [s.name for s in sims]
        keys = {s.name: s.key for s in sims}
        log = base / "daemon.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(base / "birthline.toml")],
                stderr=out, stdout=out,
            )  # fmt: skip
        try:
            await _wait_listening(port, proc)
            bundles = base / "bundles"
            cpu0 = _cpu(proc.pid)
            until = time.monotonic() + seconds
            alone = await asyncio.gather(*(
                _good(keys[n], n, port, bundles / n, until, f"A{i}") for i, n in enumerate(names[:good])
            ))  # fmt: skip
            cpu1 = _cpu(proc.pid)
            lines_before = len(log.read_text().splitlines())
            until = time.monotonic() + seconds
            attacks = [("wrong-key", names[good]), ("forge", names[good + 1]), ("replay", names[good + 2])]
            results = await asyncio.gather(
                *(_good(keys[n], n, port, bundles / n, until, f"B{i}") for i, n in enumerate(names[:good])),
                *(_attacker(kind, n, keys[n], port, bundles / n, until) for kind, n in attacks),
            )
            cpu2 = _cpu(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        under = [r for r in results[:good] if isinstance(r, int)]
        answers = [r for r in results[good:] if isinstance(r, collections.Counter)]
        lines = log.read_text().splitlines()[lines_before:]
        if show_log:
            print("\n".join(lines))
        with open_core(config) as core:
            entries = [
                e for e in AuditLog(core.journal).entries() if e.event.startswith("station.link-refused")
            ]
        audited = sum(len(json.loads(e.data)["items"]) for e in entries if e.event == "station.link-refused")
        summarised = sum(
            sum(i["suppressed"].values())
            for e in entries
            if e.event == "station.link-refused-summary"
            for i in json.loads(e.data)["items"]
        )
    print(f"station link flood, {seconds:.0f} s, birthline run on this machine, {good} good LAN fixture(s):")
    for (kind, _), counter in zip(attacks, answers, strict=True):
        total = sum(v for k, v in counter.items() if not k.startswith("connection"))
        print(f"  attacker {kind:<9}: {total} refused attempts: {dict(counter)}")
    attempts = sum(sum(c.values()) for c in answers)
    print(f"  audit: {audited} failures in full in {len([e for e in entries if e.event == 'station.link-refused'])}"
          f" entries, {summarised} counted in {len(entries) - len([e for e in entries if e.event == 'station.link-refused'])}"
          f" summary entries")  # fmt: skip
    print(f"  daemon log lines during the flood: {len(lines)} for about {attempts} refused attempts")
    print(f"  good fixtures: {sum(alone) / seconds:.1f} certificates/s alone, {sum(under) / seconds:.1f} beside the"
          f" attackers ({sum(under) / max(1, sum(alone)):.0%}); the attackers and the good fixtures share this"
          " process and the machine's cores with the daemon")  # fmt: skip
    print(f"  daemon CPU: {cpu1 - cpu0:.2f} s alone, {cpu2 - cpu1:.2f} s with the flood beside it")


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--good", type=int, default=2)
    p.add_argument("--show-log", action="store_true", help="print the daemon's log lines of the flood")
    args = p.parse_args()
    asyncio.run(bench(args.seconds, args.good, args.show_log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
