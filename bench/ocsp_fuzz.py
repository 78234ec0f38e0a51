"""Fuzz the OCSP request parser and the responder with mutations of real `openssl ocsp -reqout` requests.

    python bench/ocsp_fuzz.py [--inputs 200000] [--responder 3000] [--seed 1] [--save DIR]

A fresh SoftHSM2 token and journal: root and issuing CA, three device certificates issued through the real
IssueService (one revoked). `openssl ocsp -reqout` writes the seeds: with and without a nonce, SHA-1 and SHA-256
CertIDs, one certificate and two, by serial, and a signed request (-signer). Each input is a seed mutated at the
DER level (a node duplicated, dropped, swapped with one from another seed, its content or tag replaced, an
INTEGER or a length pushed to an edge; the tree re-encoded with correct lengths) and, sometimes, at the byte
level afterwards (bytes flipped, inserted, deleted, the input cut short).

Phase 1 feeds `--inputs` of them to `parse_request` (pure): the invariant is "an OcspRequest or a Refusal,
never an exception". Phase 2 feeds `--responder` of them to the whole responder, signatures included: the
invariant is "no internalError", and the next good request still answers. Every input that breaks an invariant
is printed and, with --save, written to DIR as <n>.der. Inputs per second are printed; this machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Union

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance import der

# A DER tree: (tag, content bytes) for a primitive, (tag, children) for a constructed element or for an
# OCTET STRING that holds exactly one DER element (extnValue, the nonce).
Node = tuple[int, Union[bytes, list["Node"]]]  # noqa: UP007 - a string-forward recursive alias


def decode(data: bytes) -> Node:
    t = der.read_tlv(data)
    if t.end != len(data):
        raise ValueError("trailing bytes")
    return _decode(data, t)


def _decode(data: bytes, t: der.Tlv) -> Node:
    content = data[t.content : t.end]
    if t.tag & 0x20 or t.tag == der.TAG_OCTET_STRING:
        try:
            kids = der.read_children(data, t)
            if t.tag == der.TAG_OCTET_STRING and (len(kids) != 1 or not content):
                raise ValueError("not one element")
            return (t.tag, [_decode(data, k) for k in kids])
        except ValueError:
            pass
    return (t.tag, content)


def encode(node: Node) -> bytes:
    tag, body = node
    content = body if isinstance(body, bytes) else b"".join(encode(c) for c in body)
    return bytes((tag,)) + der.encode_length(len(content)) + content


def _paths(node: Node, path: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    out = [path]
    if isinstance(node[1], list):
        for i, child in enumerate(node[1]):
            out.extend(_paths(child, (*path, i)))
    return out


def _get(node: Node, path: tuple[int, ...]) -> Node:
    for i in path:
        body = node[1]
        assert isinstance(body, list)
        node = body[i]
    return node


def _replace(node: Node, path: tuple[int, ...], new: list[Node]) -> Node:
    """`node` with the element at `path` replaced by `new` (zero, one or more siblings)."""
    if not path:
        return new[0] if len(new) == 1 else (der.TAG_SEQUENCE, new)
    tag, body = node
    assert isinstance(body, list)
    i, rest = path[0], path[1:]
    kids = list(body)
    if rest:
        kids[i] = _replace(kids[i], rest, new)
    else:
        kids[i : i + 1] = new
    return (tag, kids)


_EDGE_INTEGERS = [b"", b"\x00", b"\x00\x01", b"\xff", b"\x80", b"\xff\x80", b"\x01" * 21, b"\x7f" + b"\xff" * 20,
                  b"\x00" + b"\xff" * 20, b"\x01" * 200]  # fmt: skip
_INSERTS: list[Node] = [(0x01, b"\xff"), (0x01, b"\x00"), (0x05, b""), (0x02, b"\x00"), (0x04, b""),
                        (0x06, bytes.fromhex("2b0601050507300102"))]  # fmt: skip
_TAGS = [
    0x00,
    0x01,
    0x02,
    0x03,
    0x04,
    0x05,
    0x06,
    0x0C,
    0x13,
    0x30,
    0x31,
    0xA0,
    0xA1,
    0xA2,
    0xA3,
    0x80,
    0x81,
    0xBF,
]


def mutate_tree(rng: random.Random, seeds: list[Node], tree: Node) -> Node:
    paths = _paths(tree)
    path = rng.choice(paths)
    node = _get(tree, path)
    op = rng.randrange(10)
    if op == 9 and path:  # insert an element: a critical flag, a NULL, an OID, an empty OCTET STRING ...
        extra = rng.choice([*_INSERTS, (der.TAG_OID, rng.randbytes(rng.randint(1, 9)))])
        return _replace(tree, path, [extra, node] if rng.random() < 0.5 else [node, extra])
    if op == 0 and path:  # duplicate: a second request, a repeated extension, two nonces ...
        return _replace(tree, path, [node, node])
    if op == 1 and path:  # drop
        return _replace(tree, path, [])
    if op == 2:  # swap in an element of another seed
        other = rng.choice(seeds)
        return _replace(tree, path, [_get(other, rng.choice(_paths(other)))])
    if op == 3:  # random content
        return _replace(tree, path, [(node[0], rng.randbytes(rng.choice([0, 1, 2, 8, 20, 33, 64])))])
    if op == 4:  # another tag
        return _replace(tree, path, [(rng.choice(_TAGS), node[1])])
    if op == 5 and node[0] == der.TAG_INTEGER:
        return _replace(tree, path, [(node[0], rng.choice(_EDGE_INTEGERS))])
    if op == 6:  # wrap in a SEQUENCE or an explicit tag
        return _replace(tree, path, [(rng.choice([0x30, 0xA0, 0xA2, 0x04]), [node])])
    if op == 7 and isinstance(node[1], list) and node[1]:  # reorder children
        kids = list(node[1])
        rng.shuffle(kids)
        return _replace(tree, path, [(node[0], kids)])
    if op == 8 and isinstance(node[1], bytes) and node[1]:  # flip a bit inside a primitive
        raw = bytearray(node[1])
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return _replace(tree, path, [(node[0], bytes(raw))])
    return tree


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    raw = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(5)
        if not raw:
            raw = bytearray(rng.randbytes(4))
        pos = rng.randrange(len(raw))
        if op == 0:
            raw[pos] = rng.randrange(256)
        elif op == 1:
            raw[pos:pos] = rng.randbytes(rng.randint(1, 4))
        elif op == 2:
            del raw[pos : pos + rng.randint(1, 4)]
        elif op == 3:
            del raw[pos:]
        else:  # a length octet pushed to an edge
            raw[pos] = rng.choice([0x00, 0x7F, 0x80, 0x81, 0x82, 0x84, 0x85, 0xFF])
    return bytes(raw)


class Mutator:
    """Fuzz inputs from seed requests: tree mutations, then (3 times in 10) byte mutations."""

    def __init__(self, seeds: list[bytes], seed: int = 1) -> None:
        self.trees = [decode(s) for s in seeds]
        self.rng = random.Random(seed)

    def __call__(self) -> bytes:
        rng = self.rng
        tree = rng.choice(self.trees)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            tree = mutate_tree(rng, self.trees, tree)
        data = encode(tree)
        if rng.random() < 0.3:
            data = mutate_bytes(rng, data)
        return data


def openssl_seeds(tmp: Path, issuing_pem: Path, certs: list[Path], signer: tuple[Path, Path]) -> list[bytes]:
    """Requests as `openssl ocsp -reqout` writes them."""
    variants: list[list[str]] = [
        ["-cert", str(certs[0])],
        ["-cert", str(certs[0]), "-no_nonce"],
        ["-sha256", "-cert", str(certs[1])],
        ["-cert", str(certs[0]), "-cert", str(certs[1])],
        ["-serial", "0x1234", "-no_nonce"],
        ["-cert", str(certs[2]), "-signer", str(signer[0]), "-signkey", str(signer[1])],
    ]
    seeds = []
    for i, extra in enumerate(variants):
        out = tmp / f"seed{i}.der"
        subprocess.run(
            ["openssl", "ocsp", "-issuer", str(issuing_pem), *extra, "-reqout", str(out)],
            check=True, capture_output=True,
        )  # fmt: skip
        seeds.append(out.read_bytes())
    return seeds


def _requestor(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for openssl's signed requests (-signer/-signkey)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "OCSP requestor")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp / "requestor.pem", tmp / "requestor.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def main() -> int:  # pragma: no cover - a benchmark
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=200_000)
    ap.add_argument("--responder", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--save", type=Path)
    args = ap.parse_args()

    from cryptography.hazmat.primitives import serialization
    from cryptography.x509 import ocsp

    from appliance import ca as ca_mod
    from appliance.audit.log import AuditLog
    from appliance.issuance.journal import Journal
    from appliance.issuance.policy import IssueRequest
    from appliance.issuance.service import IssueService
    from appliance.profiles import builtin_profiles
    from appliance.va import revocation as rv
    from appliance.va.ocsp import INTERNAL_ERROR, OcspResponder
    from appliance.va.ocsp_request import Refusal, parse_request
    from bench.issue import make_csrs
    from hsm.softhsm import create_softhsm_token
    from hsm.token import Token

    pem = serialization.Encoding.PEM
    findings: list[tuple[str, bytes]] = []
    with tempfile.TemporaryDirectory(prefix="birthline-fuzz-ocsp-") as tmp_name:
        tmp = Path(tmp_name)
        softhsm = create_softhsm_token(tmp / "softhsm", label="fuzz")
        with Token.open(softhsm.hsm_config()) as token, Journal(tmp / "journal.sqlite") as journal:
            audit = AuditLog(journal)
            ca_mod.create_root(journal, token, "root", "CN=Fuzz Root")
            issuing = ca_mod.create_issuing(journal, token, "issuing", "CN=Fuzz Issuing", "root")

            async def issue() -> list[bytes]:
                service = IssueService(
                    journal,
                    issuing,
                    token.get_key(issuing.key_label),
                    {"idevid": builtin_profiles()["idevid"]},
                )
                async with service:
                    return [
                        (await service.issue(IssueRequest(f"FUZZ{i}", c))).certificate
                        for i, c in enumerate(make_csrs(3))
                    ]

            from cryptography import x509

            certs = [x509.load_der_x509_certificate(d) for d in asyncio.run(issue())]
            target = [(format(certs[2].serial_number, "x"), "issuing", "FUZZ2")]
            journal.call(
                journal.transaction,
                lambda c: rv.revoke_in_transaction(
                    c, audit, "fuzz", target, rv.Reason.KEY_COMPROMISE, rv.Source.CLI, now=time.time()
                ),
                "fuzz revocation",
            )
            issuing_pem = tmp / "issuing.pem"
            issuing_pem.write_bytes(issuing.certificate.public_bytes(pem))
            paths = []
            for i, c in enumerate(certs):
                paths.append(tmp / f"dev{i}.pem")
                paths[-1].write_bytes(c.public_bytes(pem))
            seeds = openssl_seeds(tmp, issuing_pem, paths, _requestor(tmp))
            mutate = Mutator(seeds, args.seed)

            statuses: Counter[str] = Counter()
            # cryptography's loader beside ours, as an outside opinion: where one takes what the other refuses.
            differ: Counter[str] = Counter()
            elapsed = 0.0
            for _ in range(args.inputs):
                data = mutate()
                t0 = time.perf_counter()
                try:
                    got = parse_request(data, 4096)
                except Exception as exc:  # noqa: BLE001 - a finding
                    findings.append((f"parse_request raised {exc!r}", data))
                    continue
                finally:
                    elapsed += time.perf_counter() - t0
                ours = got.reason if isinstance(got, Refusal) else "parsed"
                statuses[ours] += 1
                try:
                    theirs = ocsp.load_der_ocsp_request(data)
                    _ = theirs.serial_number, theirs.extensions, theirs.hash_algorithm
                    accepted = True
                except Exception:  # noqa: BLE001 - any refusal of theirs
                    accepted = False
                if accepted != (ours == "parsed"):
                    differ[f"cryptography {'accepts' if accepted else 'refuses'}, we say {ours}"] += 1
            print(f"phase 1: parse_request, {args.inputs} mutated inputs:"
                  f" {args.inputs / elapsed:,.0f} inputs/s (parsing only)")  # fmt: skip
            for reason, n in statuses.most_common():
                print(f"    {reason:<32} {n:8d}")
            print("  where cryptography's loader disagrees:")
            for what, n in differ.most_common():
                print(f"    {what:<60} {n:8d}")

            responder = OcspResponder(journal, token, audit)
            responder.load()
            answers: Counter[str] = Counter()
            t0 = time.perf_counter()
            for _ in range(args.responder):
                data = mutate()
                answer = responder.answer(data)
                answers[answer.cert_status or answer.status.name] += 1
                if answer is INTERNAL_ERROR:
                    findings.append((f"internalError: {responder.last_error!r}", data))
            rate = args.responder / (time.perf_counter() - t0)
            print(f"phase 2: the responder, {args.responder} mutated inputs: {rate:,.0f} inputs/s"
                  f" ({responder.signed} signed)")  # fmt: skip
            for what, n in answers.most_common():
                print(f"    {what:<32} {n:8d}")
            good = ocsp.load_der_ocsp_response(responder.respond(seeds[1]))
            print(f"    then a good request: {good.response_status.name} {good.certificate_status.name}")

    print(f"findings: {len(findings)}")
    for i, (what, data) in enumerate(findings[:50]):
        print(f"  {i}: {what}: {data.hex()}")
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            (args.save / f"{i}.der").write_bytes(data)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
