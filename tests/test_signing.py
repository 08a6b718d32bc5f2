"""Signed reports: `otkit keygen`, `--sign-key` on audit and certify, `otkit verify --public-key` (docs/signing.md).

The bundle is checked with the `cryptography` primitives directly, the DSSE encoding by hand and the file digests by
hashlib, so the tests do not trust kit.signing to check itself. Then one real signed audit of the digits model is
tampered with in the ways the issue lists: one changed number, a swapped engine (with and without its hash edited
into the report), a signature from another key, a truncated bundle, an altered payload, a missing bundle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from kit.signing import pae
from tests.clitools import assert_user_error, run

pytestmark = pytest.mark.slow  # trains the session's digits model (shared with other files)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify_by_hand(bundle_path: Path, pub_path: Path) -> dict:
    """The DSSE signature checked with cryptography alone; returns the statement."""
    bundle = json.loads(bundle_path.read_text())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    env = bundle["dsseEnvelope"]
    payload = base64.b64decode(env["payload"])
    t = env["payloadType"]
    assert t == "application/vnd.in-toto+json"
    message = b"DSSEv1 " + str(len(t)).encode() + b" " + t.encode() + b" " + str(len(payload)).encode() + b" " + payload
    key = serialization.load_pem_public_key(pub_path.read_bytes())
    key.verify(base64.b64decode(env["signatures"][0]["sig"]), message)  # raises InvalidSignature otherwise
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert env["signatures"][0]["keyid"] == bundle["verificationMaterial"]["publicKey"]["hint"] == \
        hashlib.sha256(der).hexdigest()
    return json.loads(payload)


def test_pae_is_the_dsse_encoding():
    # the example of the DSSE protocol document, by hand
    assert pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert pae("t", b"") == b"DSSEv1 1 t 0 "


def test_keygen_writes_a_private_pair_and_refuses_to_overwrite(tmp_path, monkeypatch):
    res = run("keygen", "--out", tmp_path / "k")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    priv, pub = tmp_path / "k.key", tmp_path / "k.pub"
    assert out["private_key"] == str(priv) and out["public_key"] == str(pub)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(priv.read_bytes(), password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert out["keyid"] == hashlib.sha256(der).hexdigest()
    assert serialization.load_pem_public_key(pub.read_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == der
    assert res.stderr.startswith(f"wrote {priv} (keep it secret")
    # --quiet: no status line, the same result on stdout; an error still speaks
    quiet = run("--quiet", "keygen", "--out", tmp_path / "q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and json.loads(quiet.stdout)["private_key"] == str(
        tmp_path / "q.key")
    assert_user_error(run("--quiet", "keygen", "--out", tmp_path / "q"), "exists")
    before = priv.read_bytes()
    assert_user_error(run("keygen", "--out", tmp_path / "k"), "exists", "--force")
    assert priv.read_bytes() == before
    assert run("keygen", "--out", tmp_path / "k", "--force").exit_code == 0 and priv.read_bytes() != before
    # with a password: encrypted on disk, and a signing command without it stops before any work
    monkeypatch.setenv("OTKIT_SIGN_PASSWORD", "s3cret")
    assert run("keygen", "--out", tmp_path / "e").exit_code == 0
    assert b"ENCRYPTED" in (tmp_path / "e.key").read_bytes()
    serialization.load_pem_private_key((tmp_path / "e.key").read_bytes(), password=b"s3cret")
    monkeypatch.delenv("OTKIT_SIGN_PASSWORD")
    res = run("audit", "--engine", tmp_path / "none.onnx", "--twin", tmp_path / "none", "--attack", "pgd-linf",
              "--out", tmp_path / "rep", "--sign-key", tmp_path / "e.key")
    assert_user_error(res, "encrypted", "OTKIT_SIGN_PASSWORD")
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("content,needle", [(b"not a key", "not a PEM private key"), (None, "signing key not found")])
def test_bad_signing_keys_are_one_line_errors(tmp_path, content, needle):
    key = tmp_path / "bad.key"
    if content is not None:
        key.write_bytes(content)
    res = run("audit", "--engine", tmp_path / "e.onnx", "--twin", tmp_path / "t", "--attack", "pgd-linf",
              "--out", tmp_path / "rep", "--sign-key", key)
    line = assert_user_error(res)
    assert needle.lower() in line.lower(), line


@pytest.fixture(scope="module")
def signed(digits_model, tmp_path_factory):
    """A signed audit of the digits model's fp32 ONNX export: (folder, engine, twin, public key, other public key,
    another engine)."""
    from exporters.checkpoint import export_checkpoint

    twin, _ = digits_model
    root = tmp_path_factory.mktemp("signed")
    engine = export_checkpoint(twin, "onnx", root / "model.onnx").path
    other_engine = export_checkpoint(twin, "onnx-fp16", root / "model-fp16.onnx").path
    for name in ("k", "other"):
        assert run("keygen", "--out", root / name).exit_code == 0
    res = run("-q", "audit", "--engine", engine, "--twin", twin, "--attack", "pgd-linf@0.3", "--samples", "40",
              "--batch-size", "40", "--rungs", "2", "--blackbox-samples", "0", "--allow-flag", "test-blind",
              "--out", root / "rep",
              "--sign-key", root / "k.key")
    assert res.exit_code == 0, res.output
    return root / "rep", engine, twin, root / "k.pub", root / "other.pub", other_engine


def verify(folder: Path, engine: Path, twin: Path, pub: Path | None, *extra):
    args = ["verify", folder, "--engine", engine, "--twin", twin, "--json", *extra]
    if pub is not None:
        args += ["--public-key", pub]
    return run("-q", *args)


def test_the_bundle_signs_the_report_and_every_subject(signed):
    rep, engine, twin, pub, _, _ = signed
    statement = _verify_by_hand(rep / "report.sigstore.json", pub)
    doc = json.loads((rep / "report.json").read_text())
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicate"] == doc
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    expected = {"engine/model.onnx": _sha(engine), "twin/" + twin.name: _sha(twin),
                f"dataset/{doc['data']['spec']}#test": doc["data"]["fingerprint"].removeprefix("sha256:")}
    for name in ("report.json", "report.md", "report.html", "curves.png", "adversarials.npz"):
        expected[name] = _sha(rep / name)
    assert subjects == expected


def test_an_untouched_signed_report_verifies(signed):
    rep, engine, twin, pub, _, _ = signed
    res = verify(rep, engine, twin, pub)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["signature"]["checked"] and all(r["match"] for r in out["signature"]["subjects"])
    assert len(out["signature"]["subjects"]) == 8
    # without the key: verify passes on the other checks and says the signature is there, unchecked
    res = verify(rep, engine, twin, None)
    assert res.exit_code == 0 and "--public-key" in res.stderr


def test_report_sign_key_without_a_fold_is_refused(signed, tmp_path, monkeypatch):
    """`otkit report --sign-key` signs only a fold of verifier results: a rendering with it is an error, not a
    silently unsigned file."""
    rep, _, _, _, _, _ = signed
    out = tmp_path / "r.html"
    res = run("report", rep, "--format", "html", "--sign-key", rep.parent / "k.key", "--out", out)
    assert_user_error(res, "--sign-key goes with --verifier-results")
    assert not out.exists()
    # a key in the environment (a CI job's, for its audits) does not stop a rendering, and is not even read
    for key in (rep.parent / "k.key", tmp_path / "absent.key"):
        monkeypatch.setenv("OTKIT_SIGN_KEY", str(key))
        res = run("report", rep, "--format", "md", "--out", out)
        assert res.exit_code == 0 and out.read_text().startswith("#"), res.output


def _tampered(signed, tmp_path, edit) -> Path:
    rep = tmp_path / "rep"
    shutil.copytree(signed[0], rep)
    edit(rep)
    return rep


def _edit_json(path: Path, change) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d, indent=1))


def _problems(res) -> str:
    assert res.exit_code == 1, res.output
    return "\n".join(json.loads(res.stdout)["problems"])


def test_one_changed_number_fails(signed, tmp_path):
    _, engine, twin, pub, _, _ = signed
    # a field no recomputation can catch: the audit's recorded wall time
    rep = _tampered(signed, tmp_path, lambda r: _edit_json(
        r / "report.json", lambda d: d["provenance"].update(seconds=d["provenance"]["seconds"] + 1)))
    text = _problems(verify(rep, engine, twin, pub))
    assert "report.json differs from the signed one" in text and "fields that differ: provenance" in text
    # the same file without --public-key: nothing else notices
    assert verify(rep, engine, twin, None).exit_code == 0


def test_a_swapped_engine_fails_even_with_its_hash_edited_in(signed, tmp_path):
    _, _, twin, pub, _, other = signed
    rep = _tampered(signed, tmp_path, lambda r: None)
    text = _problems(verify(rep, other, twin, pub, "--waive", "data", "--waive", "recheck"))
    assert "engine sha256 differs" in text and "engine/model.onnx differs from the signed one" in text
    # the forger also edits report.json to name the new engine: the signature still says otherwise
    digest = "sha256:" + _sha(other)
    _edit_json(rep / "report.json", lambda d: d["engine"].update(sha256=digest, path=str(other)))
    text = _problems(verify(rep, other, twin, pub, "--waive", "data", "--waive", "recheck"))
    assert "report.json is not the signed document" in text and "signed subject engine/model.onnx is missing" in text


def test_a_signature_from_another_key_fails(signed):
    rep, engine, twin, _, other_pub, _ = signed
    text = _problems(verify(rep, engine, twin, other_pub))
    assert "no signature verifies" in text and "signed by another key" in text


@pytest.mark.parametrize("how", ["truncated", "payload", "signature", "missing", "added"])
def test_a_damaged_bundle_fails(signed, tmp_path, how):
    _, engine, twin, pub, _, _ = signed

    def edit(r: Path) -> None:
        b = r / "report.sigstore.json"
        if how == "truncated":
            b.write_bytes(b.read_bytes()[: b.stat().st_size // 2])
        elif how == "missing":
            b.unlink()
        elif how == "added":  # a file that was not there when the report was signed
            (r / "report.html").unlink()
        else:
            def change(d: dict) -> None:
                env = d["dsseEnvelope"]
                if how == "payload":  # a better AUAC in the signed statement, the old signature kept
                    st = json.loads(base64.b64decode(env["payload"]))
                    st["predicate"]["attacks"][0]["engine"]["auac"] = 0.99
                    env["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
                else:
                    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
                    sig[0] ^= 1
                    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
            _edit_json(b, change)

    rep = _tampered(signed, tmp_path, edit)
    text = _problems(verify(rep, engine, twin, pub))
    needle = {"truncated": "not valid JSON", "payload": "does not match the payload",
              "signature": "does not match the payload", "missing": "not signed",
              "added": "signed subject report.html is missing"}[how]
    assert needle in text, text


def test_a_bad_public_key_is_an_input_error(signed, tmp_path):
    rep, engine, twin, _, _, _ = signed
    bad = tmp_path / "bad.pub"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    assert_user_error(run("verify", rep, "--engine", engine, "--twin", twin, "--public-key", bad), "not a PEM public")
    key = tmp_path.parent / "k.key"
    private = next(p for p in (signed[3].with_suffix(".key"), key) if p.exists())
    assert_user_error(run("verify", rep, "--engine", engine, "--twin", twin, "--public-key", private),
                      "private key")


def test_a_rewrite_without_the_key_leaves_no_stale_signature(signed, tmp_path):
    _, engine, twin, pub, _, _ = signed
    rep = _tampered(signed, tmp_path, lambda r: None)
    res = run("-q", "audit", "--engine", engine, "--twin", twin, "--attack", "pgd-linf@0.3", "--samples", "20",
              "--batch-size", "20", "--rungs", "2", "--blackbox-samples", "0", "--allow-flag", "test-blind",
              "--out", rep)
    assert res.exit_code == 0, res.output
    assert not (rep / "report.sigstore.json").exists()
    assert "not signed" in _problems(verify(rep, engine, twin, pub))


def test_a_signed_certificate_verifies_and_catches_an_edit(signed, tmp_path):
    _, engine, twin, pub, _, _ = signed
    key = pub.with_suffix(".key")
    out = tmp_path / "cert"
    res = run("-q", "certify", "--engine", engine, "--data", "digits:16", "--sigma", "0.25", "--n0", "32", "--n",
              "200", "--samples", "4", "--batch-size", "4", "--out", out, "--sign-key", key)
    assert res.exit_code in (0, 1), res.output
    statement = _verify_by_hand(out / "certificate.sigstore.json", pub)
    assert statement["predicate"] == json.loads((out / "certificate.json").read_text())
    assert {s["name"] for s in statement["subject"]} >= {"engine/model.onnx", "certificate.json", "certified.png"}
    args = ["verify", out, "--engine", engine, "--json", "--public-key", pub]
    res = run("-q", *args)
    assert res.exit_code == 0, res.output
    (out / "certificate.md").write_text("edited\n")
    res = run("-q", *args)
    assert res.exit_code == 1 and "certificate.md differs from the signed one" in res.stdout
