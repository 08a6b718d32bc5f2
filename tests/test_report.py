"""The audit report files: schema, Markdown / HTML / PNG renderers, atomic writing, `otkit report` and `otkit verify`.

Report documents are synthesised from real computations: per-example eps* arrays go through
:func:`evaluators.curves.curve_record`; the fidelity fields (largest curve gap, paired-bootstrap AUAC gap, exact
McNemar p-values from scipy's binomial test) are computed here independently of the kit. The recheck tests use the
trained digits model of conftest, exported to a real ONNX file, and adversarials from a real minimum-epsilon PGD search.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import html.parser
import json
import re
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import binomtest

import evaluators.report as R
from evaluators.curves import curve_record
from kit.cli import KitGroup
from kit.cli.report import report, verify
from kit.errors import UserError
from tests.test_cli import assert_user_error

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- documents
def _sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _finite(eps_star: list[float | None]) -> np.ndarray:
    return np.array([np.inf if e is None else e for e in eps_star])


def attack_entry(name: str, norm: str, eps_max: float, eps_twin: np.ndarray, eps_engine: np.ndarray,
                 tol_auac: float = 0.02, tol_curve: float = 0.05, points: int = 17) -> dict:
    """One attack of a report, from per-example eps* on the twin and on the engine."""
    twin = curve_record(eps_twin, eps_max, points=points, seed=0)
    eng = curve_record(eps_engine, eps_max, points=points, seed=0)
    grid = np.array(twin["eps_grid"])
    gaps = np.abs(np.array(eng["accuracy"]) - np.array(twin["accuracy"]))
    # paired bootstrap of the AUAC gap (engine - twin), resampling examples
    rng = np.random.default_rng(1)
    t = np.minimum(eps_twin, eps_max) / eps_max
    e = np.minimum(eps_engine, eps_max) / eps_max
    idx = rng.integers(0, len(t), size=(500, len(t)))
    boot = (e[idx] - t[idx]).mean(1)
    pvals = []
    for g in grid:
        ct, ce = eps_twin > g, eps_engine > g
        b, c = int((ct & ~ce).sum()), int((~ct & ce).sum())
        pvals.append(binomtest(b, b + c, 0.5).pvalue if b + c else 1.0)
    auac_gap = eng["auac"] - twin["auac"]
    match = abs(auac_gap) <= tol_auac and gaps.max() <= tol_curve
    return {
        "name": name, "norm": norm, "eps_max": eps_max, "config": {"steps": 10, "rungs": 8},
        "eps_grid": twin["eps_grid"],
        "twin": {k: twin[k] for k in ("accuracy", "auac", "auac_ci", "eps_star")},
        "engine": {k: eng[k] for k in ("accuracy", "auac", "auac_ci", "eps_star")},
        "fidelity": {"max_gap": float(gaps.max()), "max_gap_eps": float(grid[gaps.argmax()]), "auac_gap": auac_gap,
                     "auac_gap_ci": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
                     "mcnemar_p": [float(p) for p in pvals], "verdict": "match" if match else "mismatch",
                     "reason": "" if match else f"AUAC gap {auac_gap:+.4f} beyond tolerance {tol_auac}"},
        "passes": {"forward_per_example": 31.5, "backward_per_example": 28.25, "engine_forward_per_example": 9.0},
    }


def make_doc(attacks: list[dict], n: int, gates: list[dict] | None = None, checks: list[dict] | None = None,
             engine_sha: str | None = None, twin_sha: str | None = None) -> dict:
    """A whole otkit.report/1 document around ``attacks``; status and verdict follow from its parts."""
    gates = gates or []
    first = attacks[0]
    verdict = "match" if all(a["fidelity"]["verdict"] == "match" for a in attacks) else "mismatch"
    status = "pass" if verdict == "match" and all(g["passed"] for g in gates) else "fail"
    return {
        "schema": "otkit.report/1", "status": status, "verdict": verdict,
        "engine": {"path": "/releases/v1/model.onnx", "sha256": engine_sha or _sha("engine"), "format": "onnx",
                   "precision": "fp32", "providers": ["CPUExecutionProvider"]},
        "twin": {"path": "/releases/v1/model.safetensors", "sha256": twin_sha or _sha("twin"), "arch": "cnn-small",
                 "weights_sha256": _sha("weights")},
        "data": {"spec": "digits:16", "split": "test", "fingerprint": _sha("data"), "n": n, "seed": 0},
        "clean": {"twin_accuracy": first["twin"]["accuracy"][0], "engine_accuracy": first["engine"]["accuracy"][0],
                  "top1_agreement": 1.0, "max_logit_gap": 3.5e-06, "verdict": "match"},
        "tolerances": {"auac": 0.02, "curve": 0.05, "agreement": 0.99, "alpha": 0.05},
        "attacks": attacks,
        "checks": checks if checks is not None else [
            {"id": "zero-gradients", "severity": "warning", "attack": None, "message": "3 of 64 examples | zero"},
            {"id": "adversarial-not-verified", "severity": "error", "attack": first["name"], "message": "1 of 9 fail"}],
        "gates": gates,
        "artifacts": {"adversarials": None},
        "provenance": {"kit_version": "0.1.0", "versions": {"torch": torch.__version__, "onnxruntime": "1.20"},
                       "device": "cpu", "seed": 0, "command": "otkit audit --engine model.onnx",
                       "started": "2026-01-02T03:04:05Z", "seconds": 12.5},
    }


def honest(doc: dict) -> dict:
    """``doc`` with every figure that `otkit verify` re-derives set as :func:`evaluators.recompute.rederive` does, for
    the tests of hashes and rechecks (the re-derivation itself is tested in tests/test_verify_forgery.py)."""
    from evaluators.recompute import rederive

    r = rederive(doc)
    for a, ra in zip(doc["attacks"], r["attacks"]):
        a.update({k: ra[k] for k in ("eps_grid", "twin", "engine", "fidelity")})
    doc["clean"]["verdict"] = r["clean"]["verdict"]
    doc.update({k: r[k] for k in ("gates", "verdict", "status")})
    return doc


@pytest.fixture(scope="module")
def eps_pairs():
    """Two attacks' per-example eps* (twin, engine) on 80 examples; the L2 engine curve deliberately differs."""
    rng = np.random.default_rng(0)
    n = 80
    linf = rng.uniform(0, 0.2, n)
    linf[rng.random(n) < 0.1] = 0.0  # misclassified clean
    linf[rng.random(n) < 0.2] = np.inf  # never fooled
    linf_e = linf.copy()
    linf_e[:3] = np.where(np.isfinite(linf_e[:3]), linf_e[:3] * 1.01, linf_e[:3])
    l2 = rng.uniform(0, 2.0, n)
    l2[linf == 0] = 0.0
    l2_e = np.where(np.arange(n) % 3 == 0, l2 * 0.5, l2)  # the engine is much weaker under L2
    return n, (linf, linf_e), (l2, l2_e)


@pytest.fixture()
def doc(eps_pairs):
    n, (t1, e1), (t2, e2) = eps_pairs
    attacks = [attack_entry("pgd-linf", "linf", 0.15, t1, e1), attack_entry("pgd-l2", "l2", 1.5, t2, e2)]
    gates = [{"attack": "pgd-linf", "min_auac": 0.2, "engine_auac": attacks[0]["engine"]["auac"],
              "passed": attacks[0]["engine"]["auac"] >= 0.2},
             {"attack": "pgd-l2", "min_auac": 0.9, "engine_auac": attacks[1]["engine"]["auac"],
              "passed": attacks[1]["engine"]["auac"] >= 0.9}]
    return make_doc(attacks, n, gates=gates)


def test_fixture_document_is_a_realistic_mix(doc):
    """The synthetic document exercises both verdicts and both gate outcomes (otherwise the tests below prove less)."""
    assert [a["fidelity"]["verdict"] for a in doc["attacks"]] == ["match", "mismatch"]
    assert [g["passed"] for g in doc["gates"]] == [True, False]
    assert doc["verdict"] == "mismatch" and doc["status"] == "fail"
    assert doc["attacks"][0]["twin"]["eps_star"].count(None) > 0


# ------------------------------------------------------------------------------------------------------- schema
def test_schema_is_valid_and_accepts_the_document(doc):
    import jsonschema

    schema = R.report_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("/draft/2020-12/schema")
    assert jsonschema.Draft202012Validator(schema).is_valid(doc)
    assert R.validate_report(doc) == doc
    # numpy scalars, arrays and tuples are accepted and come back as JSON types
    d = copy.deepcopy(doc)
    d["attacks"][0]["eps_grid"] = np.array(d["attacks"][0]["eps_grid"])
    d["attacks"][0]["twin"]["auac"] = np.float32(d["attacks"][0]["twin"]["auac"])
    d["data"]["n"] = np.int64(d["data"]["n"])
    d["attacks"][0]["twin"]["auac_ci"] = tuple(d["attacks"][0]["twin"]["auac_ci"])
    plain = R.validate_report(d)
    assert json.loads(json.dumps(plain, allow_nan=False)) == plain
    assert type(plain["data"]["n"]) is int and isinstance(plain["attacks"][0]["eps_grid"], list)


def _set(d: dict, path: str, value) -> None:
    *head, last = path.split("/")
    for k in head:
        d = d[int(k)] if isinstance(d, list) else d[k]
    if value is _DELETE:
        del d[last]
    elif isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


_DELETE = object()


@pytest.mark.parametrize("path, value, named, says", [
    ("clean", _DELETE, "(top level)", "'clean' is a required property"),
    ("verdict", "maybe", "verdict", "is not one of"),
    ("extra", 1, "(top level)", "'extra' was unexpected"),
    ("engine/extra", 1, "engine", "'extra' was unexpected"),
    ("attacks/0/norm", "l3", "attacks/0/norm", "is not one of"),
    ("attacks/1/fidelity/verdict", "same", "attacks/1/fidelity/verdict", "is not one of"),
    ("checks/0/severity", "fatal", "checks/0/severity", "is not one of"),
    ("attacks/0/twin/eps_star/1", "0.1", "attacks/0/twin/eps_star/1", "is not of type"),
    ("attacks/0/twin/eps_star/2", -0.5, "attacks/0/twin/eps_star/2", "less than the minimum"),
    ("engine/sha256", "abc", "engine/sha256", "does not match"),
    ("artifacts/adversarials", "../secrets.npz", "artifacts/adversarials", "is not one of"),
    ("artifacts/adversarials_sha256", "sha256:xyz", "artifacts/adversarials_sha256", "does not match"),
    ("provenance/started", "yesterday", "provenance/started", "does not match"),
    ("attacks/0/twin/auac", float("nan"), "attacks/0/twin/auac", "not a finite number"),
    # what the schema cannot say
    ("attacks/0/engine/accuracy", [1.0, 0.5], "attacks/0/engine/accuracy", "eps_grid has 17"),
    ("attacks/0/twin/eps_star", [None] * 5, "attacks/0/twin/eps_star", "data/n is 80"),
    ("attacks/1/fidelity/mcnemar_p", [1.0], "attacks/1/fidelity/mcnemar_p", "eps_grid has 17"),
    ("attacks/1/name", "pgd-linf", "attacks/1/name", "appears twice"),
    ("attacks/0/eps_grid/0", 0.01, "attacks/0/eps_grid/0", "start at 0"),
    ("attacks/0/twin/auac_ci", [0.9, 0.1], "attacks/0/twin/auac_ci", "lower bound above"),
    ("gates/0/attack", "fgsm", "gates/0/attack", "no attack or threat model named 'fgsm'"),
    ("artifacts/adversarials_sha256", "sha256:" + "0" * 64, "artifacts/adversarials_sha256", "were not stored"),
    ("status", "pass", "status", "is pass but the verdict is mismatch"),
    ("verdict", "match", "verdict", "is match but pgd-l2 mismatch"),
])
def test_schema_rejects_corruptions(doc, path, value, named, says):
    bad = copy.deepcopy(doc)
    _set(bad, path, value)
    with pytest.raises(UserError) as e:
        R.validate_report(bad)
    msg = str(e.value)
    assert msg.startswith(f"report.json does not match otkit.report/1: {named}: "), msg
    assert says in msg and "\n" not in msg


def test_status_pass_needs_every_gate(eps_pairs):
    n, (t1, e1), _ = eps_pairs
    a = attack_entry("pgd-linf", "linf", 0.15, t1, e1)
    gate = {"attack": "pgd-linf", "min_auac": 0.99, "engine_auac": a["engine"]["auac"], "passed": False}
    d = make_doc([a], n, gates=[gate])
    assert d["verdict"] == "match" and d["status"] == "fail"
    R.validate_report(d)
    d["status"] = "pass"
    with pytest.raises(UserError, match="status: is pass but gate\\(s\\) failed: pgd-linf"):
        R.validate_report(d)


def test_load_report_reads_folder_or_file_and_refuses_bad_input(doc, tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(doc))
    assert R.load_report(tmp_path) == doc and R.load_report(tmp_path / "report.json") == doc
    with pytest.raises(UserError, match="report not found: .*nowhere"):
        R.load_report(tmp_path / "nowhere")
    with pytest.raises(UserError, match="report not found: .*empty.report.json"):
        (tmp_path / "empty").mkdir()
        R.load_report(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "otkit.report/1",')
    with pytest.raises(UserError, match=r"bad.json is not valid JSON: line 1 column"):
        R.load_report(bad)
    bad.write_text(json.dumps(doc).replace('"seconds": 12.5', '"seconds": NaN'))
    with pytest.raises(UserError, match="NaN is not valid JSON"):
        R.load_report(bad)
    bad.write_text(json.dumps({**doc, "schema": "otkit.report/2"}))
    with pytest.raises(UserError, match=r"has schema 'otkit.report/2'; this kit reads otkit.report/1"):
        R.load_report(bad)
    bad.write_text(json.dumps({k: v for k, v in doc.items() if k != "schema"}))
    with pytest.raises(UserError, match="has no schema id"):
        R.load_report(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object, got list"):
        R.load_report(bad)
    bad.write_text(json.dumps({**doc, "gates": "none"}))
    with pytest.raises(UserError, match=r"bad.json does not match otkit.report/1: gates: 'none' is not of type"):
        R.load_report(bad)


# ----------------------------------------------------------------------------------------------------- markdown
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text.strip())


def parse_md_table(md: str, header_start: str) -> list[dict[str, str]]:
    """The GFM table whose header row starts with ``header_start``, as dicts of unescaped cells."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(f"| {header_start}"))
    rows = []
    for line in lines[i:]:
        if not line.startswith("|"):
            break
        rows.append([_unescape(c) for c in _CELL_SPLIT.split(line.strip())[1:-1]])
    header, sep, *body = rows
    assert all(set(c) <= {"-", ":"} for c in sep)
    assert all(len(r) == len(header) for r in body)
    return [dict(zip(header, r)) for r in body]


def _nums(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


def test_markdown_tables_carry_the_numbers(doc):
    md = R.render_markdown(doc)
    first = md.splitlines()[0]
    assert first.startswith("# ") and "verdict mismatch" in first and "status fail" in first
    rows = parse_md_table(md, "attack")
    assert [r["attack"] for r in rows] == ["pgd-linf", "pgd-l2"]
    for row, a in zip(rows, doc["attacks"]):
        f = a["fidelity"]
        assert row["norm"] == a["norm"] and float(row["eps_max"]) == pytest.approx(a["eps_max"])
        twin = _nums(row["twin AUAC [95% CI]"])
        eng = _nums(row["engine AUAC [95% CI]"])
        gap = _nums(row["AUAC gap [95% CI]"])
        curve = _nums(row["max curve gap"])
        np.testing.assert_allclose(twin, [a["twin"]["auac"], *a["twin"]["auac_ci"]], atol=5e-5)
        np.testing.assert_allclose(eng, [a["engine"]["auac"], *a["engine"]["auac_ci"]], atol=5e-5)
        np.testing.assert_allclose(gap, [f["auac_gap"], *f["auac_gap_ci"]], atol=5e-5)
        np.testing.assert_allclose(curve, [f["max_gap"], f["max_gap_eps"]], rtol=1e-3, atol=5e-5)
        assert row["verdict"] == f["verdict"]
    # the gap column is engine - twin, recomputed here from the eps* of each side
    a = doc["attacks"][1]
    exact = (np.minimum(_finite(a["engine"]["eps_star"]), 1.5).mean() - np.minimum(_finite(a["twin"]["eps_star"]),
                                                                                   1.5).mean()) / 1.5
    assert _nums(rows[1]["AUAC gap [95% CI]"])[0] == pytest.approx(exact, abs=5e-5) and exact < 0
    gates = parse_md_table(md, "attack | min AUAC")
    assert [(g["attack"], float(g["min AUAC"]), g["result"]) for g in gates] == [("pgd-linf", 0.2, "pass"),
                                                                                 ("pgd-l2", 0.9, "FAIL")]
    assert float(gates[1]["engine AUAC (upper bound)"]) == pytest.approx(doc["attacks"][1]["engine"]["auac"], abs=5e-5)
    assert "AUAC gap" in md and "beyond tolerance" in md  # the mismatch reason
    clean = next(line for line in md.splitlines() if line.startswith("**Clean inputs:**"))
    assert "top-1 agreement 1.0000" in clean and "3.5e-06" in clean
    # checks with severity, a pipe in a message escaped; hashes and the kit version in the provenance
    assert "- **warning** `zero-gradients` (model): 3 of 64 examples \\| zero" in md
    assert "- **error** (fails the audit) `adversarial-not-verified` (pgd-linf)" in md
    for h in (doc["engine"]["sha256"], doc["twin"]["sha256"], doc["data"]["fingerprint"]):
        assert f"`{h}`" in md
    assert "- otkit: 0.1.0" in md and "<" not in md.replace("\\<", "")


def test_markdown_escapes_pipes_and_html_in_cells(doc):
    d = copy.deepcopy(doc)
    d["attacks"][0]["name"] = "pgd|linf <b>x</b>"
    d["gates"][0]["attack"] = d["attacks"][0]["name"]
    md = R.render_markdown(d)
    rows = parse_md_table(md, "attack")
    assert rows[0]["attack"] == "pgd|linf <b>x</b>" and len(rows[0]) == 8
    assert "<b>" not in md and "\\<b\\>" in md


def test_no_checks_no_gates_sections(eps_pairs):
    n, (t1, e1), _ = eps_pairs
    d = make_doc([attack_entry("pgd-linf", "linf", 0.15, t1, e1)], n, checks=[])
    md = R.render_markdown(d)
    assert "No check raised a flag." in md and "No AUAC gate was set." in md
    assert md.splitlines()[0].startswith("# \u2705") and "status pass" in md.splitlines()[0]


# --------------------------------------------------------------------------------------------------------- html
class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained_and_escapes(doc):
    d = copy.deepcopy(doc)
    evil = "<script>alert('x')</script>"
    d["attacks"][0]["name"] = evil
    d["gates"][0]["attack"] = evil
    d["checks"][1]["attack"] = evil
    d["checks"][0]["message"] = 'look <img src="https://evil.example/x.png"> & "quotes"'
    clean_page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", R.render_html(doc, R.plot_png(doc)))
    assert "http" not in clean_page.lower() and "url(" not in clean_page and "@import" not in clean_page
    png = R.plot_png(d)
    page = R.render_html(d, png)
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "<script" not in page.lower() and "<img src=\"http" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    p = _Tags()
    p.feed(page)
    tags = {t for t, _ in p.tags}
    assert not tags & {"script", "iframe", "link", "object", "embed", "base"}
    srcs = [a["src"] for t, a in p.tags if "src" in a]
    assert len(srcs) == 1 and all(not any(k in a for k in ("href", "srcset")) for _, a in p.tags)
    prefix = "data:image/png;base64,"
    assert srcs[0].startswith(prefix)
    decoded = base64.b64decode(srcs[0][len(prefix):], validate=True)
    assert decoded == png and decoded.startswith(PNG_MAGIC)
    text = " ".join(p.text)
    assert evil in text and 'look <img src="https://evil.example/x.png"> & "quotes"' in text  # shown, not obeyed
    for h in (d["engine"]["sha256"], d["twin"]["sha256"], d["data"]["fingerprint"]):
        assert h in text
    assert "verdict: mismatch" in text and "status: fail" in text
    assert R.render_html(d, None).count("<img") == 0


def test_plot_draws_twin_solid_and_engine_dashed_on_the_grid(doc, monkeypatch):
    import io

    from matplotlib.axes import Axes
    from PIL import Image

    calls = []
    real = Axes.plot

    def spy(self, *args, **kwargs):
        calls.append((self.get_title(), args, kwargs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    png = R.plot_png(doc)
    assert png.startswith(PNG_MAGIC)
    assert len(calls) == 4
    for k, a in enumerate(doc["attacks"]):
        (_, (xt, yt, st), kt), (_, (xe, ye, se), ke) = calls[2 * k], calls[2 * k + 1]
        assert list(xt) == a["eps_grid"] == list(xe)
        assert list(yt) == a["twin"]["accuracy"] and list(ye) == a["engine"]["accuracy"]
        assert (st, se) == ("-", "--")
        assert kt["label"] == f"twin (AUAC {a['twin']['auac']:.3f}, upper bound)"
        assert ke["label"] == f"engine (AUAC {a['engine']['auac']:.3f}, upper bound)"
    one = copy.deepcopy(doc)
    one["attacks"] = one["attacks"][:1]
    w2 = Image.open(io.BytesIO(png)).size[0]
    w1 = Image.open(io.BytesIO(R.plot_png(one))).size[0]
    assert w2 > 1.5 * w1  # one panel per attack


def test_plot_survives_dollar_signs_in_names(doc):
    d = copy.deepcopy(doc)
    d["attacks"][0]["name"] = "a$b^{$c"  # would be broken mathtext
    assert R.plot_png(d).startswith(PNG_MAGIC)


# --------------------------------------------------------------------------------------------------------- files
def _adversarials(doc: dict, m: int = 5) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for a in doc["attacks"]:
        out[a["name"]] = {"x": rng.random((m, 1, 16, 16)).astype(np.float32), "y": rng.integers(0, 10, m),
                          "index": np.arange(m) * 3, "eps": rng.random(m), "pred": rng.integers(0, 10, m)}
    return out


def test_write_report_writes_json_last_and_round_trips(doc, tmp_path, monkeypatch):
    order = []
    real = R.atomic_write

    def recording(path, mode="wb"):
        order.append(Path(path).name)
        return real(path, mode)

    monkeypatch.setattr(R, "atomic_write", recording)
    adv = _adversarials(doc)
    before = copy.deepcopy(doc)
    paths = R.write_report(doc, tmp_path / "out", adv)
    assert doc == before  # the caller's document is not modified
    assert order == list(R.REPORT_FILES) and order[-1] == "report.json"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(R.REPORT_FILES)
    assert [p.name for p in paths] == list(R.REPORT_FILES) and all(p.parent == tmp_path / "out" for p in paths)
    paths = {p.suffix[1:]: p for p in paths}
    written = R.load_report(tmp_path / "out")
    npz_sha = "sha256:" + hashlib.sha256(paths["npz"].read_bytes()).hexdigest()  # the hash of the bytes written
    assert written == {**doc, "artifacts": {"adversarials": "adversarials.npz", "adversarials_sha256": npz_sha}}
    assert paths["md"].read_text() == R.render_markdown(written)
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
    assert base64.b64encode(paths["png"].read_bytes()).decode() in paths["html"].read_text()
    back = R.load_adversarials(paths["npz"])
    assert set(back) == set(adv)
    for name, arrays in adv.items():
        for k, v in arrays.items():
            assert back[name][k].dtype == R.ADVERSARIAL_FIELDS[k]
            np.testing.assert_array_equal(back[name][k], v)
    # a rewrite without adversarials removes the stale npz and says so in the document
    assert [p.name for p in R.write_report(doc, tmp_path / "out", None)] == list(R.REPORT_FILES[1:])
    assert not (tmp_path / "out" / "adversarials.npz").exists()
    assert R.load_report(tmp_path / "out")["artifacts"]["adversarials"] is None


def test_failed_write_leaves_no_report_json(doc, tmp_path, monkeypatch):
    out = tmp_path / "out"
    R.write_report(doc, out, None)
    assert (out / "report.json").exists()

    def broken(*_a, **_k):
        raise RuntimeError("disk full while plotting")

    monkeypatch.setattr(R, "plot_report", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        R.write_report(doc, out, _adversarials(doc))
    assert not (out / "report.json").exists()  # the old, complete-looking report is gone too
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_bad_document_or_arrays_write_nothing(doc, tmp_path):
    bad = copy.deepcopy(doc)
    bad["verdict"] = "perhaps"
    with pytest.raises(UserError, match="verdict"):
        R.write_report(bad, tmp_path / "a", _adversarials(doc))
    assert not (tmp_path / "a").exists()
    adv = _adversarials(doc)
    adv["pgd-linf"]["y"] = adv["pgd-linf"]["y"][:2]
    with pytest.raises(ValueError, match="pgd-linf"):
        R.write_report(doc, tmp_path / "b", adv)
    with pytest.raises(ValueError, match="not an attack of the report"):
        R.write_report(doc, tmp_path / "b", {"fgsm": _adversarials(doc)["pgd-linf"]})
    assert not (tmp_path / "b").exists()


def test_remove_report_deletes_report_json_first(doc, tmp_path, monkeypatch):
    R.write_report(doc, tmp_path, _adversarials(doc))
    (tmp_path / "keep.txt").write_text("mine")
    order = []
    real = Path.unlink

    def spy(self, *a, **k):
        order.append(self.name)
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", spy)
    removed = R.remove_report(tmp_path)
    assert order[0] == "report.json" and sorted(order) == sorted([*R.REPORT_FILES, R.SIGNATURE_FILE])
    assert [p.name for p in removed] == [n for n in order if n != R.SIGNATURE_FILE]  # the report was not signed
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    assert R.remove_report(tmp_path) == [] and R.remove_report(tmp_path / "missing") == []


def test_load_adversarials_refuses_corrupt_files(doc, tmp_path):
    npz = R.write_report(doc, tmp_path, _adversarials(doc))[0]
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        R.load_adversarials(npz)
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(UserError, match="not an .npz archive"):
        R.load_adversarials(tmp_path / "one.npy")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(UserError, match="unexpected array 'weights'"):
        R.load_adversarials(tmp_path / "other.npz")
    np.savez(tmp_path / "part.npz", **{"a/x": np.zeros((2, 1, 4, 4), np.float32), "a/y": np.zeros(2, np.int64)})
    with pytest.raises(UserError, match="'a' lacks eps, index, pred"):
        R.load_adversarials(tmp_path / "part.npz")
    with pytest.raises(UserError, match="not found"):
        R.load_adversarials(tmp_path / "none.npz")


# ----------------------------------------------------------------------------------------------------------- CLI
def _group() -> click.Group:
    """The otkit group when it has registered the commands; else a small KitGroup around them."""
    from kit.cli import cli

    if {"report", "verify"} <= set(cli.commands):
        return cli

    @click.group(cls=KitGroup)
    @click.pass_context
    def g(ctx: click.Context) -> None:
        ctx.obj = {"device": "cpu", "seed": 0, "quiet": False}

    g.add_command(report)
    g.add_command(verify)
    return g


def run(*args: str):
    return CliRunner().invoke(_group(), [str(a) for a in args], catch_exceptions=False)


def test_cli_report_round_trips_each_format(doc, tmp_path):
    R.write_report(doc, tmp_path, None)
    stored = R.load_report(tmp_path)
    r = run("report", tmp_path)
    assert r.exit_code == 0, r.output
    assert r.stdout == R.render_markdown(stored)
    r = run("report", tmp_path / "report.json", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout) == stored
    out = tmp_path / "page.html"
    r = run("report", tmp_path, "--format", "html", "--out", out)
    assert r.exit_code == 0 and r.stdout == "" and f"wrote {out}" in r.stderr
    page = out.read_text()
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(uri).startswith(PNG_MAGIC)
    assert page == R.render_html(stored, base64.b64decode(uri))
    r = run("report", tmp_path, "--format", "md", "--out", tmp_path / "notes.md")
    assert r.exit_code == 0 and (tmp_path / "notes.md").read_text() == (tmp_path / "report.md").read_text()


def test_cli_report_user_errors(doc, tmp_path):
    assert_user_error(run("report", tmp_path / "missing"), "report not found", "missing")
    (tmp_path / "report.json").write_text(json.dumps({**doc, "schema": "otkit.curves/1"}))
    assert_user_error(run("report", tmp_path), "has schema 'otkit.curves/1'")
    (tmp_path / "report.json").write_text(json.dumps({**doc, "verdict": "ok"}))
    assert_user_error(run("report", tmp_path, "--format", "json"), "does not match otkit.report/1: verdict")
    R.write_report(doc, tmp_path, None)
    assert_user_error(run("report", tmp_path, "--out", tmp_path / "no" / "such.md"), "does not exist")
    r = run("report", tmp_path, "--format", "pdf")
    assert r.exit_code == 2 and "pdf" in r.stderr


def test_cli_verify_hashes(eps_pairs, tmp_path):
    n, (t1, e1), _ = eps_pairs
    engine, twin = tmp_path / "model.onnx", tmp_path / "model.safetensors"
    engine.write_bytes(b"engine bytes")
    twin.write_bytes(b"twin bytes")
    sha = lambda p: "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    d = honest(make_doc([attack_entry("pgd-linf", "linf", 0.15, t1, e1)], n, engine_sha=sha(engine),
                        twin_sha=sha(twin)))
    R.write_report(d, tmp_path / "rep", None)
    # this report stores no adversarials (so nothing to recheck) and its engine and twin are stand-in bytes: the
    # audited examples cannot be replayed on them
    no_adv = ("--waive", "adversarials", "--waive", "data")
    r = run("verify", tmp_path / "rep" / "report.json", "--engine", engine, "--twin", twin, *no_adv)
    assert r.exit_code == 0, r.output
    assert re.search(r"engine sha256\s+model.onnx\s+sha256:\S+\s+sha256:\S+\s+match", r.stdout)
    assert re.search(r"twin sha256\s+model.safetensors\s+.*match", r.stdout)
    assert r.stderr == "verify: waived: adversarials, data\n"
    r = run("verify", tmp_path / "rep", "--engine", engine, "--json", *no_adv, "--waive", "twin")
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and out["match"] is True and out["hashes"][0]["actual"] == sha(engine)
    assert out["waived"] == ["twin", "adversarials", "data"]

    engine.write_bytes(b"engine bytes, patched")
    r = run("verify", tmp_path / "rep", "--engine", engine, "--twin", twin, *no_adv)
    assert r.exit_code == 1
    assert "DIFFERS" in r.stdout
    line, waived = r.stderr.strip().splitlines()
    assert line.startswith("verify: engine sha256 differs: ") and str(engine) in line and sha(engine) in line
    assert waived == "verify: waived: adversarials, data"
    twin.write_bytes(b"other twin")
    r = run("verify", tmp_path / "rep", "--engine", engine, "--twin", twin, "--json", *no_adv)
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["match"] is False and [h["match"] for h in out["hashes"]] == [False, False, None]
    assert len(r.stderr.strip().splitlines()) == 3 and "twin sha256 differs" in r.stderr
    assert "not a valid checkpoint" in r.stderr  # the hint: not even a checkpoint

    assert_user_error(run("verify", tmp_path / "none.json", "--engine", engine), "report not found")
    assert_user_error(run("verify", tmp_path / "rep", "--engine", tmp_path / "gone.onnx"), "engine file not found")
    r = run("verify", tmp_path / "rep", "--engine", engine, "--twin", twin, "--recheck", "3", "--waive", "data")
    assert r.exit_code == 1 and "verify: adversarials not checked: the report stores no adversarials" in r.stderr


# ------------------------------------------------------------------------------------------------------- recheck
@pytest.fixture(scope="module")
def audited(digits_model, tmp_path_factory):
    """A real ONNX export of the digits twin and a report whose adversarials come from real PGD attacks on the twin.

    Each example's eps* is the size of its PGD adversarial (0 where misclassified clean, inf where PGD failed). Only
    adversarials the engine misclassifies with a top-2 logit margin above 1e-3 are stored, so that a re-run in another
    batch split (last-bit differences) cannot flip them.
    """
    from exporters.onnx import OnnxRuntimeEngine, torch_to_onnx, write_onnx_export
    from kit.attacks.pgd import PGD
    from kit.checkpoint import load_twin
    from kit.data import load_dataset

    path, _ = digits_model
    model, info = load_twin(path)
    ds = load_dataset("digits:16", "test").subset(48, seed=0)
    folder = tmp_path_factory.mktemp("audited")
    graph = torch_to_onnx(model, info.input_shape, dynamo=False)
    onnx_path = write_onnx_export(graph, folder / "model.onnx", model, ds.x, info=info, parity_y=ds.y,
                                  precision="fp32").path
    engine = OnnxRuntimeEngine(onnx_path)
    attacks, adversarials = [], {}
    for name, norm, eps_max in (("pgd-linf", "linf", 0.3), ("pgd-l2", "l2", 3.0)):
        res = PGD(model, eps=eps_max, norm=norm, steps=10, seed=0)(ds.x, ds.y)
        logits = engine(res.x_adv)
        pred = logits.argmax(1)
        top2 = torch.topk(logits, 2, dim=1).values
        eps_t = torch.where(res.success, res.norm.double().clamp(max=eps_max), torch.inf).numpy()
        fooled = res.success & (res.norm > 0) & (pred != ds.y)
        keep = (fooled & (top2[:, 0] - top2[:, 1] > 1e-3)).nonzero().flatten()
        assert len(keep) >= 8, f"{name}: only {len(keep)} adversarials to store"
        # the engine side: fooled on the stored adversarials (as an audit stores every one the engine falls for)
        eps_e = np.full(len(ds), np.inf)
        eps_e[keep.numpy()] = eps_t[keep.numpy()]
        attacks.append(attack_entry(name, norm, eps_max, eps_t, eps_e, tol_auac=1.0, tol_curve=1.0))
        adversarials[name] = {"x": res.x_adv[keep].numpy(), "y": ds.y[keep].numpy(), "index": keep.numpy(),
                              "eps": eps_t[keep.numpy()], "pred": pred[keep].numpy()}
    doc = honest(make_doc(attacks, len(ds), engine_sha=engine.sha256))
    doc["engine"]["path"] = str(onnx_path)
    R.write_report(doc, folder / "report", adversarials)
    return folder / "report", onnx_path, adversarials


@pytest.mark.slow  # trains the session's digits model (shared with other files)
def test_verify_recheck_with_a_real_engine(audited):
    rep, onnx_path, adversarials = audited
    no_twin = ("--waive", "twin", "--waive", "data")  # a report made here, not by an audit: no data to replay
    r = run("verify", rep, "--engine", onnx_path, "--recheck", "7", "--json", *no_twin)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["match"] is True and out["problems"] == [] and out["waived"] == ["twin", "data"]
    assert [(h["item"], h["match"]) for h in out["hashes"]] == [("engine sha256", True), ("twin sha256", None),
                                                                ("adversarials sha256", True)]
    assert out["adversarials"]["match"] is True and out["recomputed"]["match"] is True
    checked = {row["attack"]: row["checked"] for row in out["recheck"]}
    assert checked == {"pgd-linf": 4, "pgd-l2": 3}  # spread across attacks
    assert all(row["pred_match"] == row["checked"] == row["still_adversarial"] for row in out["recheck"])
    r = run("verify", rep, "--engine", onnx_path, "--json", *no_twin)  # the default: 16
    assert r.exit_code == 0 and sum(row["checked"] for row in json.loads(r.stdout)["recheck"]) == 16
    total = sum(len(a["y"]) for a in adversarials.values())
    r = run("verify", rep, "--engine", onnx_path, "--recheck", "1000", *no_twin)
    assert r.exit_code == 0, r.output
    assert re.search(r"recheck pgd-linf\s+adversarials.npz\s+\d+ adversarial\(s\)", r.stdout)
    rows = re.findall(r"recheck \S+\s+adversarials.npz\s+(\d+) adversarial\(s\)", r.stdout)
    assert sum(int(m) for m in rows) == total


@pytest.mark.slow  # trains the session's digits model (shared with other files)
def test_rechecked_positions_are_drawn_at_random():
    """What verify runs again is drawn from the OS's entropy: sorted, distinct, all of them when asked for more, and
    not the same positions from one verify to the next (a forger cannot know where it will look)."""
    from evaluators.replay import random_picks
    from kit.cli.report import _spread

    assert random_picks(5, 9) == [0, 1, 2, 3, 4]
    draws = [random_picks(10_000, 3) for _ in range(4)]
    assert all(d == sorted(set(d)) and len(d) == 3 and all(0 <= v < 10_000 for v in d) for d in draws)
    assert len({tuple(d) for d in draws}) > 1
    picks = _spread({"pgd-linf": 40, "pgd-l2": 2}, 7)
    assert [len(picks["pgd-linf"]), len(picks["pgd-l2"])] == [5, 2] and picks["pgd-l2"] == [0, 1]


def test_verify_recheck_catches_tampered_predictions(audited, tmp_path):
    import shutil

    rep, onnx_path, adversarials = audited
    no_twin = ("--waive", "twin", "--waive", "data")  # a report made here, not by an audit: no data to replay
    work = tmp_path / "rep"
    shutil.copytree(rep, work)
    tampered = {k: {f: v.copy() for f, v in a.items()} for k, a in adversarials.items()}
    tampered["pgd-l2"]["pred"][0] = (tampered["pgd-l2"]["pred"][0] + 1) % 10
    flat = {f"{k}/{f}": v for k, a in tampered.items() for f, v in a.items()}
    np.savez(work / "adversarials.npz", **flat)
    # the stored hash catches the edit without running anything
    r = run("verify", work, "--engine", onnx_path, "--json", "--recheck", "0", "--waive", "recheck", *no_twin)
    assert r.exit_code == 1, r.output
    out = json.loads(r.stdout)
    assert [(h["item"], h["match"]) for h in out["hashes"]] == [("engine sha256", True), ("twin sha256", None),
                                                                ("adversarials sha256", False)]
    line, waived = r.stderr.strip().splitlines()
    assert line.startswith("verify: adversarials sha256 differs: ") and "adversarials.npz" in line
    assert waived == "verify: waived: twin, recheck, data"
    r = run("verify", work, "--engine", onnx_path, "--recheck", "1000", *no_twin)  # all: the draw is random
    assert r.exit_code == 1, r.output
    hash_line, line, _ = r.stderr.strip().splitlines()
    assert hash_line.startswith("verify: adversarials sha256 differs")
    idx = int(adversarials["pgd-l2"]["index"][0])
    assert line.startswith(f"verify: recheck pgd-l2 example {idx}: prediction changed")
    assert re.search(r"recheck pgd-l2 .*DIFFERS", r.stdout) and re.search(r"recheck pgd-linf .*match", r.stdout)
    # a stored "adversarial" the engine classifies correctly is a failure too (and the content check says so)
    tampered = {k: {f: v.copy() for f, v in a.items()} for k, a in adversarials.items()}
    tampered["pgd-linf"]["y"][0] = tampered["pgd-linf"]["pred"][0]
    np.savez(work / "adversarials.npz", **{f"{k}/{f}": v for k, a in tampered.items() for f, v in a.items()})
    r = run("verify", work, "--engine", onnx_path, "--recheck", "1000", "--json", *no_twin)
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["recheck"][0]["failures"][0]["why"] == "classified correctly"
    assert "prediction is their label" in out["adversarials"]["problems"][0]
    # a corrupt archive is an input error
    data = (rep / "adversarials.npz").read_bytes()
    (work / "adversarials.npz").write_bytes(data[:100])
    assert_user_error(run("verify", work, "--engine", onnx_path, "--recheck", "6", *no_twin), "adversarials.npz")
    # a report published without its adversarials fails, unless the missing file is waived (and then says so)
    (work / "adversarials.npz").unlink()
    r = run("verify", work, "--engine", onnx_path, "--recheck", "6", *no_twin)
    assert r.exit_code == 1 and "verify: adversarials not checked: " in r.stderr
    r = run("verify", work, "--engine", onnx_path, *no_twin, "--waive", "adversarials")
    assert r.exit_code == 0, r.output
    assert re.search(r"adversarials sha256\s+adversarials.npz\s+sha256:\S+\s+absent\s+waived", r.stdout)
    assert r.stderr == "verify: waived: twin, adversarials, data\n"
