r"""Signed attestations: ed25519 keys, in-toto statements in DSSE envelopes, in Sigstore bundles (docs/signing.md).

A report is signed as an `in-toto Statement v1 <https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md>`_
whose ``subject`` lists the artifacts it speaks about (name and sha256) and whose ``predicate`` is the report itself.
The statement is the payload of a `DSSE <https://github.com/secure-systems-lab/dsse/blob/master/envelope.md>`_
envelope: the signature covers the pre-authentication encoding

.. math:: \mathrm{PAE}(t, b) = \texttt{"DSSEv1"}\ \|\ \text{len}(t)\ \|\ t\ \|\ \text{len}(b)\ \|\ b

(ASCII decimal lengths, single spaces between the five fields) of the payload type :math:`t` =
``application/vnd.in-toto+json`` and the payload bytes :math:`b`, so the statement's bytes are signed as written and
need no canonical form. The envelope sits in a `Sigstore bundle v0.3
<https://github.com/sigstore/protobuf-specs/blob/main/protos/sigstore_bundle.proto>`_ (JSON) whose verification
material is a public-key hint: the key id, the hex sha256 of the public key's DER SubjectPublicKeyInfo. Offline key
mode: no transparency-log entry and no certificate (keyless signing needs a network; docs/signing.md shows it as
the CI path).

Keys are ed25519 (``cryptography``), PEM: PKCS#8 for the private key (encrypted when a password is given, read
from the environment variable :data:`PASSWORD_ENV`), SubjectPublicKeyInfo for the public one. Nothing here unpickles.

Verification (:func:`open_bundle`) never raises on a bad bundle: a truncated file, a wrong media type, a signature
by another key are *findings* (strings), so that ``otkit verify`` can report them with exit status 1; a public key
that cannot be read is an input error (:class:`~kit.errors.UserError`, exit 2).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit.errors import UserError

__all__ = ["BUNDLE_MEDIA_TYPE", "PASSWORD_ENV", "PAYLOAD_TYPE", "STATEMENT_TYPE", "PublicKey", "SigningKey",
           "generate_keypair", "load_public_key", "load_signing_key", "make_statement", "open_bundle", "pae",
           "sign_statement"]

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
#: The environment variable holding the private key's password (none: the key file is not encrypted).
PASSWORD_ENV = "OTKIT_SIGN_PASSWORD"
# a bundle larger than this is not one of ours (a report's predicate is a few hundred kB at most)
_MAX_BUNDLE = 64 << 20


@dataclass(frozen=True)
class SigningKey:
    """An ed25519 private key and the id of its public half."""

    key: Any  # cryptography's Ed25519PrivateKey
    keyid: str
    path: str


@dataclass(frozen=True)
class PublicKey:
    """An ed25519 public key and its id."""

    key: Any  # cryptography's Ed25519PublicKey
    keyid: str
    path: str


def _keyid(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _password() -> bytes | None:
    value = os.environ.get(PASSWORD_ENV)
    return value.encode("utf-8") if value else None


def generate_keypair(prefix: str | os.PathLike[str], *, force: bool = False) -> tuple[Path, Path, str]:
    """Write a new ed25519 key pair: ``PREFIX.key`` (PKCS#8 PEM, mode 0600, encrypted with the password in
    :data:`PASSWORD_ENV` when it is set) and ``PREFIX.pub`` (SubjectPublicKeyInfo PEM).

    Returns (private path, public path, key id). Existing files are refused unless ``force``: a signing key is not
    something to overwrite by accident.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from kit.io import atomic_write

    prefix = Path(prefix)
    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    if not force:
        for p in (private, public):
            if p.exists():
                raise UserError(f"{p} exists: keep it, choose another --out, or give --force to replace the pair")
    if not private.parent.is_dir():
        raise UserError(f"no such folder: {private.parent}")
    key = Ed25519PrivateKey.generate()
    password = _password()
    enc = (serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with atomic_write(private) as f:
        os.chmod(f.name, 0o600)  # before the key's bytes reach the disk
        f.write(pem)
    with atomic_write(public) as f:
        f.write(pub)
    return private, public, _keyid(key.public_key())


def _read_pem(path: str | os.PathLike[str], what: str) -> bytes:
    from kit.io import require_file

    p = require_file(path, what)
    if p.stat().st_size > 1 << 16:
        raise UserError(f"{p} is not a {what} (PEM): {p.stat().st_size} bytes")
    return p.read_bytes()


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Read an ed25519 private key (PKCS#8 PEM, as :func:`generate_keypair` writes it; the password from
    :data:`PASSWORD_ENV` if the file is encrypted). Anything else is a one-line :class:`UserError`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_pem(path, "signing key")
    password = _password()
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError as e:  # encrypted without a password, or a password for a plain key
        if "not encrypted" in str(e):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            raise UserError(f"{path}: the signing key is encrypted: set {PASSWORD_ENV} to its password") from None
    except ValueError as e:
        why = "wrong password" if password and "password" in str(e).lower() else "not a PEM private key"
        raise UserError(f"{path}: cannot read the signing key ({why})") from None
    except Exception as e:  # noqa: BLE001 - cryptography raises its own types for malformed keys
        raise UserError(f"{path}: cannot read the signing key ({type(e).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{path}: the signing key must be ed25519 (otkit keygen), not {type(key).__name__}")
    return SigningKey(key, _keyid(key.public_key()), str(path))


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """Read an ed25519 public key (SubjectPublicKeyInfo PEM); anything else is a one-line :class:`UserError`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_pem(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        hint = " (that is a private key: give its .pub)" if b"PRIVATE KEY" in data else ""
        raise UserError(f"{path}: not a PEM public key{hint}") from None
    except Exception as e:  # noqa: BLE001 - cryptography raises its own types for malformed keys
        raise UserError(f"{path}: cannot read the public key ({type(e).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"{path}: the public key must be ed25519 (otkit keygen), not {type(key).__name__}")
    return PublicKey(key, _keyid(key), str(path))


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding of (payload type, payload): what the signature covers."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def make_statement(subjects: list[dict[str, Any]], predicate_type: str, predicate: dict[str, Any]) -> dict[str, Any]:
    """An in-toto Statement v1: ``subjects`` as ``{"name": ..., "digest": {"sha256": hex}}``."""
    return {"_type": STATEMENT_TYPE, "subject": subjects, "predicateType": predicate_type, "predicate": predicate}


def sign_statement(statement: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    """The Sigstore bundle (v0.3, JSON) of a DSSE envelope signing ``statement`` with ``key``."""
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    sig = key.key.sign(pae(PAYLOAD_TYPE, payload))
    envelope = {"payload": base64.b64encode(payload).decode("ascii"), "payloadType": PAYLOAD_TYPE,
                "signatures": [{"keyid": key.keyid, "sig": base64.b64encode(sig).decode("ascii")}]}
    return {"mediaType": BUNDLE_MEDIA_TYPE,
            "verificationMaterial": {"publicKey": {"hint": key.keyid}, "tlogEntries": []},
            "dsseEnvelope": envelope}


def _b64(text: Any) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def open_bundle(path: str | os.PathLike[str], public_key: PublicKey) -> tuple[dict[str, Any] | None, list[str]]:
    """Read a bundle written by :func:`sign_statement` and check its signature with ``public_key``.

    Returns (statement, findings): the statement when a signature by ``public_key`` verifies over the envelope's
    payload and the payload is an in-toto Statement v1, else None; ``findings`` says what is wrong (empty when all
    is well). A missing file is a finding too: the report was not signed.
    """
    from cryptography.exceptions import InvalidSignature

    p = Path(path)
    if not p.is_file():
        return None, [f"not signed: no {p.name} beside the report"]
    if p.stat().st_size > _MAX_BUNDLE:
        return None, [f"{p.name} is not a signature bundle ({p.stat().st_size} bytes)"]
    try:
        bundle = json.loads(p.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, [f"{p.name} is not valid JSON (truncated or corrupt)"]
    if not isinstance(bundle, dict) or bundle.get("mediaType") != BUNDLE_MEDIA_TYPE:
        got = bundle.get("mediaType") if isinstance(bundle, dict) else type(bundle).__name__
        return None, [f"{p.name} is not a Sigstore bundle v0.3 (mediaType {got!r})"]
    env = bundle.get("dsseEnvelope")
    if not isinstance(env, dict):
        return None, [f"{p.name} holds no DSSE envelope"]
    if env.get("payloadType") != PAYLOAD_TYPE:
        return None, [f"{p.name}: payloadType {env.get('payloadType')!r} is not {PAYLOAD_TYPE!r}"]
    payload = _b64(env.get("payload"))
    sigs = env.get("signatures")
    if payload is None or not isinstance(sigs, list) or not sigs:
        return None, [f"{p.name}: the envelope's payload or signatures are missing or not base64"]
    message = pae(PAYLOAD_TYPE, payload)
    good = False
    for s in sigs:
        raw = _b64(s.get("sig")) if isinstance(s, dict) else None
        if raw is None:
            continue
        try:
            public_key.key.verify(raw, message)
        except InvalidSignature:
            continue
        good = True
        break
    if not good:
        ids = sorted({str(s.get("keyid")) for s in sigs if isinstance(s, dict)})
        other = [i for i in ids if i != public_key.keyid]
        why = (f"signed by another key ({', '.join(k[:16] for k in other)}...)" if other
               else "the signature does not match the payload (altered or truncated)")
        return None, [f"{p.name}: no signature verifies with {public_key.path} (key id {public_key.keyid[:16]}...): "
                      f"{why}"]
    try:
        statement = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, [f"{p.name}: the signed payload is not JSON"]
    if (not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE
            or not isinstance(statement.get("subject"), list) or not isinstance(statement.get("predicate"), dict)):
        return None, [f"{p.name}: the signed payload is not an in-toto Statement v1"]
    return statement, []
