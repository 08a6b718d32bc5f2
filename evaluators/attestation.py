"""Signing a report or certificate folder, and checking a signed one (docs/signing.md).

The statement (:mod:`kit.signing`) of a folder names, as its subjects:

- ``engine/<file name>``: the engine's identity as the document records it (:func:`exporters.onnx.engine_sha256`:
  the file's sha256, or for an ONNX file with external data a digest over the model and its data files);
- ``twin/<file name>``: the twin's file sha256 (a certificate without a twin has none);
- ``dataset/<spec>#<split>``: the fingerprint of the examples drawn (their digest, not a file);
- every file of the folder the command wrote (``report.json``, ``report.md``, ``report.html``, ``curves.png``,
  ``adversarials.npz``; or the certificate's four), by name;

and its predicate is the document itself (``report.json`` / ``certificate.json`` parsed), under the predicate type
:data:`PREDICATE_TYPES`. The bundle is written beside the document as ``report.sigstore.json`` (or
``certificate.sigstore.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from evaluators import certificate, report
from kit.io import atomic_write, path_name, sha256_file
from kit.signing import PublicKey, SigningKey, make_statement, open_bundle, sign_statement

__all__ = ["BUNDLE_NAMES", "PREDICATE_TYPES", "check_signature", "document_kind", "sign_folder", "subjects"]

#: The in-toto predicate type of each kind of document.
PREDICATE_TYPES = {"report": "https://otkit.dev/attestation/report/v1",
                   "certificate": "https://otkit.dev/attestation/certificate/v1"}
#: The bundle's file name beside each kind of document.
BUNDLE_NAMES = {"report": report.SIGNATURE_FILE, "certificate": certificate.SIGNATURE_FILE}
_FILES = {"report": report.REPORT_FILES, "certificate": certificate.CERTIFICATE_FILES}
_MAIN = {"report": "report.json", "certificate": "certificate.json"}


def document_kind(doc: dict[str, Any]) -> str:
    """``"report"`` or ``"certificate"``, from the document's schema."""
    return "certificate" if certificate.is_certificate(doc) else "report"


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1] if digest.startswith("sha256:") else digest


def subjects(doc: dict[str, Any], folder: str | os.PathLike[str], *, engine_sha256: str | None = None,
             twin_sha256: str | None = None) -> list[dict[str, Any]]:
    """The statement's subjects for ``doc`` and the files of its ``folder`` (module docstring), in a fixed order.
    ``engine_sha256`` / ``twin_sha256`` (``"sha256:<hex>"``), when given, stand in for the document's record of
    those files (``otkit verify`` hashes the files it is given)."""
    kind = document_kind(doc)
    engine = engine_sha256 or doc["engine"]["sha256"]
    out = [{"name": f"engine/{path_name(doc['engine']['path'])}", "digest": {"sha256": _hex(engine)}}]
    if doc.get("twin"):
        twin = twin_sha256 or doc["twin"]["sha256"]
        out.append({"name": f"twin/{path_name(doc['twin']['path'])}", "digest": {"sha256": _hex(twin)}})
    data = doc["data"]
    out.append({"name": f"dataset/{data['spec']}#{data['split']}", "digest": {"sha256": _hex(data["fingerprint"])}})
    folder = Path(folder)
    for name in _FILES[kind]:
        p = folder / name
        if p.is_file():
            out.append({"name": name, "digest": {"sha256": sha256_file(p)}})
    return out


def sign_folder(folder: str | os.PathLike[str], key: SigningKey, kind: str = "report") -> Path:
    """Sign the folder a report (``kind="report"``) or certificate was just written to; returns the bundle's path
    (written atomically). The predicate is the document as written (``report.json`` read back: the writer adds
    fields, such as the adversarials' hash, to its own copy)."""
    folder = Path(folder)
    doc = json.loads((folder / _MAIN[kind]).read_text(encoding="utf-8"))
    statement = make_statement(subjects(doc, folder), PREDICATE_TYPES[kind], doc)
    path = folder / BUNDLE_NAMES[kind]
    with atomic_write(path, "w") as f:
        json.dump(sign_statement(statement, key), f, indent=1)
        f.write("\n")
    return path


def check_signature(doc: dict[str, Any], folder: str | os.PathLike[str], public_key: PublicKey, *,
                    engine_sha256: str | None = None, twin_sha256: str | None = None) -> tuple[list[dict], list[str]]:
    """Check the folder's bundle with ``public_key`` and every subject it signs.

    ``doc`` is the document as read from the folder; ``engine_sha256`` / ``twin_sha256`` (``"sha256:<hex>"``) are
    the identities of the files given to ``otkit verify``, compared with the signed ones when given. Returns (rows,
    findings): one row per subject (name, signed digest, found digest, match) and what is wrong, empty when the
    signature verifies, the signed predicate is ``doc``, the subjects are exactly those :func:`subjects` lists, and
    every digest matches.
    """
    kind = document_kind(doc)
    folder = Path(folder)
    bundle = folder / BUNDLE_NAMES[kind]
    statement, findings = open_bundle(bundle, public_key)
    if statement is None:
        return [], findings
    if statement.get("predicateType") != PREDICATE_TYPES[kind]:
        findings.append(f"{bundle.name}: predicate type {statement.get('predicateType')!r} is not "
                        f"{PREDICATE_TYPES[kind]!r}")
    if statement["predicate"] != doc:
        keys = sorted(k for k in set(doc) | set(statement["predicate"]) if doc.get(k) != statement["predicate"].get(k))
        findings.append(f"{_MAIN[kind]} is not the signed document (fields that differ: {', '.join(keys)})")
    signed: dict[str, str] = {}
    for s in statement["subject"]:
        digest = s.get("digest") if isinstance(s, dict) else None
        if not isinstance(digest, dict) or not isinstance(s.get("name"), str) or not isinstance(
                digest.get("sha256"), str):
            findings.append(f"{bundle.name}: a subject without a name or a sha256 digest")
            continue
        signed[s["name"]] = digest["sha256"]
    found = {s["name"]: s["digest"]["sha256"]
             for s in subjects(doc, folder, engine_sha256=engine_sha256, twin_sha256=twin_sha256)}
    rows = []
    for name in sorted(set(signed) | set(found), key=lambda n: (n not in signed, n)):
        exp, act = signed.get(name), found.get(name)
        rows.append({"subject": name, "signed": exp, "found": act, "match": exp == act})
        if exp is None:
            findings.append(f"{name} is in the folder but not among the signed subjects (added after signing)")
        elif act is None:
            findings.append(f"signed subject {name} is missing")
        elif exp != act:
            findings.append(f"{name} differs from the signed one: sha256 {act[:16]}..., signed {exp[:16]}...")
    return rows, findings
