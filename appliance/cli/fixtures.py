"""Fixture-side commands: `birthline station-client enroll` and `birthline simulate`.

`station-client` needs only a credential bundle (``birthline station add --out DIR``), never the appliance's
configuration: it is what a fixture on another machine runs. `simulate` drives N simulated fixtures against a
RUNNING appliance; serial stations come from the appliance's registry (keys and registered ports), LAN
stations from their bundles (the registry keeps no TLS client keys).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import names
from appliance.cli import argfiles, argtypes
from appliance.files import FileRefused, refuse_shared_files, secret_directory, write_private, write_public
from stations.client import (
    StationCredentials,
    chain_pem,
    connect,
    generate_device_key,
    key_pem,
    load_credentials,
    make_csr,
    new_request_id,
    split_host_port,
)
from stations.errors import StationError

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def _load_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    with argfiles.parsing("--keygen", path, "a PEM private key"):
        key = serialization.load_pem_private_key(argfiles.read_bytes("--keygen", path), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("not an EC private key")
    return key


def _read_csr(path: Path) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = argfiles.read_bytes("--csr", path)
    if b"-----BEGIN" in data:
        with argfiles.parsing("--csr", path, "a PEM certificate request"):
            return x509.load_pem_x509_csr(data).public_bytes(serialization.Encoding.DER)
    return data


def _credentials(option: str, path: str) -> StationCredentials:
    """A credential bundle named on the command line; what is wrong with it in one line. Like ssh with a private
    key, its secret files (*.key: the station key, the TLS client key) are refused while group or others can
    read them."""
    try:
        refuse_shared_files(sorted(Path(path).glob("*.key")), "the station's secrets")
    except FileRefused as exc:
        raise argfiles.ArgumentFileError(option, path, exc.message) from None
    try:
        return load_credentials(path)
    except OSError as exc:
        where = exc.filename or path
        raise argfiles.ArgumentFileError(option, path, f"{where}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise argfiles.ArgumentFileError(option, path, f"not a station credential bundle: {exc!r}") from None


def cmd_station_client_enroll(args: argparse.Namespace) -> int:
    creds = _credentials("--credentials", args.credentials)
    # The device's private key is written here: refuse a directory someone else could swap it in.
    out = secret_directory(Path(args.out))
    serial = args.serial
    safe = "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in serial)
    # The request id (and a generated key) are stored BEFORE sending, so a rerun after a crash or a lost
    # answer retries the same request and gets the same certificate (docs/station-protocol.md section 6).
    rid_file = out / f"{safe}.request"
    if rid_file.exists():
        with argfiles.parsing("--out", rid_file, "a request id file (hex)"):
            request_id = bytes.fromhex(argfiles.read_text("--out", rid_file).strip())
    else:
        request_id = new_request_id()
        write_private(rid_file, request_id.hex().encode() + b"\n")
    if args.keygen:
        key_file = out / f"{safe}.key"
        if key_file.exists():
            key = _load_key(key_file)
        else:
            key = generate_device_key()
            write_private(key_file, key_pem(key))
        csr = make_csr(key, serial)
    else:
        csr = _read_csr(Path(args.csr))
    if args.host:
        split_host_port(args.host)  # validate early
    elif args.port is None:  # where the bundle points: a LAN bundle's host, a serial bundle's port
        if creds.kind == "lan" and (creds.host is None or creds.tcp_port is None):
            raise argfiles.ArgumentFileError(
                "--credentials", args.credentials, "the bundle names no appliance host: give --host HOST:PORT"
            )
        if creds.kind == "serial" and creds.port is None:
            raise argfiles.ArgumentFileError(
                "--credentials", args.credentials, "the bundle names no serial port: give --port PATH"
            )

    async def run() -> list[bytes]:
        async with await connect(
            creds, port=args.port, host=args.host, baud=args.baud, give_up_after=args.timeout
        ) as client:
            chain = await client.enroll(serial, csr, request_id=request_id, profile=args.profile)
            await client.confirm(request_id, chain[0])
            return chain

    try:
        chain = asyncio.run(run())
    except StationError as exc:
        print(f"birthline station-client: {exc.code.name} ({int(exc.code)}): {exc.text}", file=sys.stderr)
        return 1
    write_public(out / f"{safe}.pem", chain_pem(chain))
    rid_file.unlink(missing_ok=True)  # final outcome reached: CONFIRMED
    print(f"{serial}: enrolled and confirmed, {len(chain)} certificate(s) in {out / (safe + '.pem')}")
    return 0


def _registry_stations(config_path: str, kind: str) -> list[Any]:
    from appliance.config import load_config
    from appliance.issuance.journal import Journal
    from appliance.stations_registry import list_stations
    from stations.simulator import SimStation

    cfg = load_config(Path(config_path))
    with Journal(cfg.journal.path, read_only=True) as journal:
        records = list_stations(journal)
    return [
        SimStation(r.name, "serial", r.key, port=r.port)
        for r in records
        if r.kind == kind == "serial" and r.enabled and r.port
    ]


def _bundle_stations(dirs: list[str], host: str | None) -> list[Any]:
    from stations.simulator import SimStation

    out = []
    for d in dirs:
        c = _credentials("--credentials", d)
        h, p = split_host_port(host) if host else (c.host, c.tcp_port)
        out.append(
            SimStation(
                c.name, c.kind, c.key, port=c.port, host=h, tcp_port=p, ssl_context=c.ssl_context,
                server_hostname=c.server_hostname,
            )
        )  # fmt: skip
    return out


def cmd_simulate(args: argparse.Namespace) -> int:
    from stations.simulator import simulate

    kind = "lan" if args.lan else "serial"
    if args.credentials:
        host = args.host
        if kind == "lan" and host is None and Path(args.config).exists():
            from appliance.config import load_config

            address = load_config(Path(args.config)).stations.lan_address
            host = f"{address[0]}:{address[1]}" if address else None
        stations = [s for s in _bundle_stations(args.credentials, host) if s.kind == kind]
    elif kind == "serial":
        stations = _registry_stations(args.config, kind)
    else:
        print("birthline simulate --lan needs --credentials DIR (one bundle per station)", file=sys.stderr)
        return 2
    if len(stations) < args.stations:
        print(
            f"birthline simulate: {args.stations} {kind} station(s) asked for, {len(stations)} available",
            file=sys.stderr,
        )
        return 2
    report = asyncio.run(
        simulate(
            stations[: args.stations],
            args.devices,
            baud=args.baud,
            profile=args.profile,
            give_up_after=args.timeout,
        )
    )
    print(report.summary())
    return 0 if report.failures == 0 else 1


def register(sub: Any, with_config: WithConfig) -> None:
    """Add `station-client` and `simulate` to the `birthline` parser."""
    sc = sub.add_parser("station-client", help="fixture side: talk to the appliance with a station bundle")
    scs = sc.add_subparsers(dest="sub", required=True)
    sp = scs.add_parser("enroll", help="enrol one device, confirm it, write its certificate chain")
    where = sp.add_mutually_exclusive_group()
    where.add_argument(
        "--port",
        help="serial port: /dev/serial/by-path/... (not by-id: spoofable) or a URL (default: the bundle's)",
    )
    where.add_argument(
        "--host", help="appliance HOST:PORT (TLS; default: the bundle's, the first of [appliance] names)"
    )
    sp.add_argument("--credentials", required=True, help="the station bundle directory (station add --out)")
    sp.add_argument(
        "--serial", required=True, type=argtypes.name(names.DEVICE_SERIAL), help="device serial number"
    )
    key = sp.add_mutually_exclusive_group(required=True)
    key.add_argument("--csr", help="the device's PKCS#10 request (PEM or DER)")
    key.add_argument(
        "--keygen", action="store_true", help="generate a P-256 key here; writes DIR/<serial>.key"
    )
    sp.add_argument("--out", default=".", help="where <serial>.pem (and .key) go (default .)")
    sp.add_argument("--baud", type=int, help="serial baud rate (default: the bundle's, else 115200)")
    sp.add_argument(
        "--profile", type=argtypes.name(names.PROFILE), help="certificate profile (default: the station's)"
    )
    sp.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    sp.set_defaults(func=cmd_station_client_enroll)

    sp = with_config(sub.add_parser("simulate", help="run N simulated fixtures against a running appliance"))
    sp.add_argument("--stations", type=int, required=True)
    sp.add_argument("--devices", type=int, required=True, help="devices per station")
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument("--serial", action="store_true", help="serial stations over socat ptys (default)")
    mode.add_argument("--lan", action="store_true", help="LAN stations over TLS")
    sp.add_argument("--baud", type=int, help="pace the serial lines to this rate (default: unpaced)")
    sp.add_argument(
        "--credentials", action="append", help="station bundle dir (repeat); instead of the registry"
    )
    sp.add_argument("--host", help="appliance HOST:PORT for LAN bundles that do not name it")
    sp.add_argument("--profile", type=argtypes.name(names.PROFILE))
    sp.add_argument("--timeout", type=float, default=60.0, help="per-request give-up time in seconds")
    sp.set_defaults(func=cmd_simulate)
