"""Run by the listener flood tests (python -m tests.appliance.flood_client MODE PORT CONNECTIONS ADDRESSES [BASE]):
CONNECTIONS concurrent connections to 127.0.0.1:PORT (or the Unix socket PORT, a path) from ADDRESSES source
addresses 127.0.BASE.1 and up, each re-made as soon as the daemon ends it (50 ms later; at once for `churn`),
until stdin closes; then prints one JSON line of counts.

    hello      a TLS ClientHello, then silence (a station that never sends its certificate)
    slowbody   POST headers for a 4,000-byte body (FLOOD_PATH, FLOOD_CONTENT_TYPE), then a byte a second
    body415    POST to FLOOD_PATH with a 200 KB body and no Content-Type, the whole body at once
    churn      FLOOD_DATA (default: half a GET request), then silence
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import ssl
import sys


def client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="x")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


async def main() -> None:
    mode, target, conns, addresses = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    base = int(sys.argv[5]) if len(sys.argv) > 5 else 10
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    path = os.environ.get("FLOOD_PATH", "/")
    ctype = os.environ.get("FLOOD_CONTENT_TYPE", "")
    partial = os.environ.get("FLOOD_DATA", "GET / HTTP/1.1\r\nHost: x\r\n").encode()
    hello = client_hello()
    counts = {"connections": 0, "errors": 0, "answers": 0}
    stop = asyncio.Event()

    async def watch_stdin() -> None:
        await asyncio.to_thread(sys.stdin.read)
        stop.set()

    async def one(i: int) -> None:
        a = i % addresses
        source = (f"127.0.{base + a // 250}.{1 + a % 250}", 0)
        while not stop.is_set():
            try:
                if target.startswith("/"):
                    reader, writer = await asyncio.open_unix_connection(target)
                else:
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", int(target), local_addr=source
                    )
            except OSError:
                counts["errors"] += 1
                await asyncio.sleep(0.2)
                continue
            counts["connections"] += 1
            try:
                if mode == "hello":
                    writer.write(hello)
                elif mode == "slowbody":
                    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: 4000\r\n\r\n"
                    writer.write(head.encode())
                elif mode == "body415":
                    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 262144\r\n\r\n"
                    writer.write(head.encode() + b"A" * 200_000)
                elif mode == "churn":
                    writer.write(partial)
                await writer.drain()
                while not stop.is_set():
                    if mode == "slowbody":
                        try:
                            data = await asyncio.wait_for(reader.read(4096), 1.0)
                        except TimeoutError:
                            writer.write(b"x")
                            await writer.drain()
                            continue
                    else:
                        data = await reader.read(65536)
                    if not data:
                        break
                    counts["answers"] += 1
            except (OSError, ConnectionError):
                counts["errors"] += 1
            finally:
                writer.close()
            await asyncio.sleep(0 if mode == "churn" else 0.05)

    watcher = asyncio.create_task(watch_stdin())
    tasks = [asyncio.create_task(one(i)) for i in range(conns)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    watcher.cancel()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
