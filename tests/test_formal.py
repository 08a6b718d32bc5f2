"""`otkit export-spec` and `otkit report --verifier-results` (docs/verifiers.md).

The VNN-LIB files are read back with the `vnnlib` package (VNN-COMP's reader format, `read_vnnlib_simple`), not the
kit. On a linear network the question a property asks has an exact answer (the largest score difference over a box
is a sum of per-coordinate maxima), so the parsed files are checked to ask exactly the right question: unsat where
the margin exceeds the Lipschitz bound times the radius, sat (with the witness corner checked) where it does not. On a
real audit, every exported box is the clamped L-inf ball around the example, drawn independently from the data.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from evaluators.formal import vnnlib_property
from tests.clitools import assert_user_error, run

compat = pytest.importorskip("vnnlib.compat", reason="the VNN-LIB 1.0 reader (pip install vnnlib==0.0.1.post1)")


def _parse(path: Path, n_in: int, n_out: int):
    """(box (n_in, 2), [(mat, rhs), ...]) of a single-case property, by the vnnlib package."""
    cases = compat.read_vnnlib_simple(path, n_in, n_out)
    assert len(cases) == 1
    box, spec = cases[0]
    return np.asarray(box, dtype=np.float64), [(np.asarray(m, dtype=np.float64), np.asarray(r, dtype=np.float64))
                                                for m, r in spec]


def _exact_linear(box: np.ndarray, spec, w: np.ndarray, b: np.ndarray) -> tuple[bool, np.ndarray | None]:
    """Is some y = W x + b with x in the box inside one disjunct {mat y <= rhs} (each disjunct one row here)? Exact
    for one-row disjuncts: maximise -(mat W) x over the box coordinate-wise. Returns (sat, witness)."""
    for mat, rhs in spec:
        assert mat.shape[0] == 1
        c = (mat @ w)[0]  # mat (W x + b) <= rhs  <=>  c x <= rhs - mat b
        x = np.where(c > 0, box[:, 0], box[:, 1])  # the corner that minimises c x
        if c @ x <= (rhs - mat @ b)[0, 0] + 0.0:
            return True, x
    return False, None


@pytest.mark.parametrize("radius,expected", [(0.05, "unsat"), (0.4, "sat")])
def test_a_linear_networks_property_asks_exactly_the_robustness_question(tmp_path, radius, expected):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 6))
    x = rng.uniform(0.2, 0.8, size=6)
    y = int(np.argmax(w @ x))
    b = np.zeros(3)
    b[y] = 0.5  # a margin of at least 0.5
    margin = min((w[y] - w[j]) @ x + b[y] - b[j] for j in range(3) if j != y)
    lipschitz = max(np.abs(w[y] - w[j]).sum() for j in range(3) if j != y)  # of the margin, in L-inf
    assert (margin > lipschitz * radius) == (expected == "unsat")  # the two cases are what they claim
    lo, hi = np.clip(x - radius, 0, 1), np.clip(x + radius, 0, 1)
    path = tmp_path / "p.vnnlib"
    path.write_text(vnnlib_property(lo, hi, y, 3, "a comment\nover two lines"))
    box, spec = _parse(path, 6, 3)
    assert np.array_equal(box[:, 0], lo) and np.array_equal(box[:, 1], hi)  # exactly the box, bit for bit
    assert len(spec) == 2  # one disjunct per other class: Y_j - Y_y >= 0
    for (mat, rhs), j in zip(spec, [j for j in range(3) if j != y]):
        row = np.zeros(3)
        row[y], row[j] = 1, -1
        assert np.array_equal(mat[0], row) and rhs[0, 0] == 0
    sat, witness = _exact_linear(box, spec, w, b)
    assert sat == (expected == "sat")
    if sat:  # the witness is an adversarial inside the box
        assert np.all(witness >= lo) and np.all(witness <= hi) and np.argmax(w @ witness + b) != y



@pytest.fixture(scope="module")
def audited(digits_model, tmp_path_factory):
    """A small L-inf audit of the digits model's fp32 ONNX export, and the int8 export."""
    from exporters.checkpoint import export_checkpoint

    twin, _ = digits_model
    root = tmp_path_factory.mktemp("formal")
    engine = export_checkpoint(twin, "onnx", root / "model.onnx").path
    int8 = export_checkpoint(twin, "onnx-int8", root / "model-int8.onnx").path
    res = run("-q", "audit", "--engine", engine, "--twin", twin, "--attack", "pgd-linf@0.3", "--samples", "40",
              "--batch-size", "40", "--rungs", "2", "--blackbox-samples", "0", "--allow-flag", "test-blind",
              "--ci", "none", "--out", root / "audit")
    assert res.exit_code == 0, res.output
    return root, engine, int8, twin


@pytest.mark.slow
def test_exported_boxes_are_the_audits_robust_balls(audited, tmp_path):
    from kit.data import load_dataset

    root, engine, _, _ = audited
    doc = json.loads((root / "audit" / "report.json").read_text())
    res = run("export-spec", root / "audit", "--engine", engine, "--radius", "0.05", "--radius", "0.1",
              "--max-examples", "4", "--timeout", "60", "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["is_audited_engine"] and out["instances"] == 8
    data = load_dataset(doc["data"]["spec"], doc["data"]["split"]).subset(doc["data"]["n"], seed=doc["data"]["seed"])
    x, y = data.x.numpy().astype(np.float64), data.y.numpy()
    eps = doc["worst_case"][0]["engine"]["eps_star"]
    rows = list(csv.reader((tmp_path / "b" / "instances.csv").read_text().splitlines()))
    manifest = json.loads((tmp_path / "b" / "otkit-spec.json").read_text())
    assert len(rows) == 8 and all(r[0] == "onnx/model.onnx" and r[2] == "60" for r in rows)
    session = ort.InferenceSession(str(tmp_path / "b" / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 1  # a static batch of one
    original = ort.InferenceSession(str(engine), providers=["CPUExecutionProvider"])
    n_in = x[0].size
    for row, inst in zip(rows, manifest["instances"]):
        i, r = inst["index"], inst["radius"]
        assert row[1] == inst["vnnlib"] and inst["label"] == y[i]
        assert eps[i] is None or eps[i] > r  # robust at r by the audit
        box, spec = _parse(tmp_path / "b" / row[1], n_in, 10)
        assert np.array_equal(box[:, 0], np.clip(x[i] - r, 0, 1).reshape(-1))
        assert np.array_equal(box[:, 1], np.clip(x[i] + r, 0, 1).reshape(-1))
        assert len(spec) == 9 and all(m[0, y[i]] == 1 and m[0].sum() == 0 and rh[0, 0] == 0 for m, rh in spec)
        xi = x[i: i + 1].astype(np.float32)
        a = session.run(None, {session.get_inputs()[0].name: xi})[0]
        assert np.array_equal(a, original.run(None, {original.get_inputs()[0].name: xi})[0])
        assert np.argmax(a) == y[i]
    # the per-radius order: the first robust examples, in audit order
    for r in (0.05, 0.1):
        want = [i for i, e in enumerate(eps) if (e is None or e > r)][:4]
        assert [inst["index"] for inst in manifest["instances"] if inst["radius"] == r] == want


@pytest.mark.slow
def test_a_stored_adversarial_is_a_sat_witness_of_its_ball(audited, tmp_path):
    """The other direction on the real network: an adversarial the audit stored lies inside the box of its own radius
    and satisfies the property's output disjunction on the exported ONNX (so a verifier must answer sat there)."""
    from evaluators.report import load_adversarials
    from kit.data import load_dataset

    root, engine, _, _ = audited
    doc = json.loads((root / "audit" / "report.json").read_text())
    adv = load_adversarials(root / "audit" / "adversarials.npz")["pgd-linf"]
    data = load_dataset("digits:16", "test").subset(doc["data"]["n"], seed=doc["data"]["seed"])
    k = int(np.argmax(adv["eps"] > 0))
    i, r = int(adv["index"][k]), float(adv["eps"][k])
    xi = data.x[i].numpy().astype(np.float64)
    path = tmp_path / "adv.vnnlib"
    path.write_text(vnnlib_property(np.clip(xi - r, 0, 1), np.clip(xi + r, 0, 1), int(adv["y"][k]), 10))
    box, spec = _parse(path, xi.size, 10)
    z = adv["x"][k].astype(np.float64).reshape(-1)
    assert np.all(z >= box[:, 0] - 1e-7) and np.all(z <= box[:, 1] + 1e-7)
    session = ort.InferenceSession(str(engine), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: adv["x"][k: k + 1].astype(np.float32)})[0][0]
    assert any((m @ logits <= rh.reshape(-1)).all() for m, rh in spec)


@pytest.mark.slow
def test_an_engine_with_external_data_is_written_as_one_file(audited, tmp_path):
    import onnx

    root, engine, _, _ = audited
    proto = onnx.load(str(engine))
    onnx.external_data_helper.convert_model_to_external_data(proto, all_tensors_to_one_file=True,
                                                             location="w.data", size_threshold=64)
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save(proto, str(ext))
    assert (ext.parent / "w.data").is_file()
    # not the audited engine's bytes (the report hashed the self-contained file): refused as another file...
    assert_user_error(run("export-spec", root / "audit", "--engine", ext, "--out", tmp_path / "b"),
                      "not the audited engine")
    # ...so audit it as it is, then export: one file, the same logits
    res = run("-q", "audit", "--engine", ext, "--twin", audited[3], "--attack", "pgd-linf@0.3", "--samples", "20",
              "--batch-size", "20", "--rungs", "2", "--blackbox-samples", "0", "--allow-flag", "test-blind",
              "--ci", "none", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert run("export-spec", tmp_path / "a", "--engine", ext, "--radius", "0.05", "--max-examples", "2", "--out",
               tmp_path / "b").exit_code == 0
    written = onnx.load(str(tmp_path / "b" / "onnx" / "model.onnx"), load_external_data=False)
    assert not onnx.external_data_helper.uses_external_data(written.graph.initializer[0]) and \
        not any(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer)
    x = np.random.default_rng(0).uniform(size=(1, 1, 16, 16)).astype(np.float32)
    a = ort.InferenceSession(str(tmp_path / "b" / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(engine), providers=["CPUExecutionProvider"])
    assert np.array_equal(a.run(None, {a.get_inputs()[0].name: x})[0], b.run(None, {b.get_inputs()[0].name: x})[0])


def _results(bench: Path, answers: dict[int, str], header: bool = True) -> Path:
    rows = list(csv.reader((bench / "instances.csv").read_text().splitlines()))
    path = bench / "results.csv"
    lines = ["benchmark,onnx,vnnlib,prepare_time,result,run_time"] if header else []
    lines += [f"otkit,{o},{v},0.1,{answers.get(n, 'unsat')},1.5" for n, (o, v, _) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_verifier_answers_fold_into_the_report(audited, tmp_path):
    import shutil

    root, engine, _, twin = audited
    rep = tmp_path / "rep"
    shutil.copytree(root / "audit", rep)
    assert run("export-spec", rep, "--engine", engine, "--radius", "0.05", "--max-examples", "5", "--out",
               tmp_path / "b").exit_code == 0
    results = _results(tmp_path / "b", {0: "sat", 1: "timeout", 2: "unknown"})
    res = run("report", rep, "--verifier-results", results, "--spec", tmp_path / "b", "--verifier", "abcrown 2026")
    assert res.exit_code == 0, res.output
    doc = json.loads((rep / "report.json").read_text())
    v = doc["verification"]
    assert v["verifier"] == "abcrown 2026" and v["is_audited_engine"]
    (r,) = v["radii"]
    assert (r["properties"], r["unsat"], r["sat"], r["unknown"]) == (5, 2, 1, 2)
    assert r["verified_accuracy"] == 2 / doc["data"]["n"]
    eps = doc["worst_case"][0]["engine"]["eps_star"]
    assert r["attack_accuracy"] == sum(e is None or e > 0.05 for e in eps) / doc["data"]["n"]
    assert r["verified_accuracy"] <= r["attack_accuracy"]  # the lower bound sits below the upper one
    (f,) = [c for c in doc["checks"] if c["id"] == "verifier-beats-attacks"]
    assert f["severity"] == "warning" and "1 ball" in f["message"]
    assert "## Formal verification" in (rep / "report.md").read_text() and "warning" in res.stderr
    assert doc["status"] == "pass"  # a warning: the verdict and gates stand
    # the folded report still verifies: every derived figure, the adversarials' new hash, the replay
    res = run("-q", "verify", rep, "--engine", engine, "--twin", twin)
    assert res.exit_code == 0, res.output
    # a signed report: folding removes the old signature (the report changed) and --sign-key signs the new one
    assert run("keygen", "--out", tmp_path / "k").exit_code == 0
    res = run("report", rep, "--verifier-results", results, "--spec", tmp_path / "b", "--sign-key",
              tmp_path / "k.key")
    assert res.exit_code == 0 and (rep / "report.sigstore.json").is_file()
    res = run("-q", "verify", rep, "--engine", engine, "--twin", twin, "--public-key", tmp_path / "k.pub")
    assert res.exit_code == 0, res.output
    # folding again replaces the section (all unsat now), and the flag goes
    res = run("report", rep, "--verifier-results", _results(tmp_path / "b", {}, header=False), "--spec",
              tmp_path / "b")
    doc = json.loads((rep / "report.json").read_text())
    assert doc["verification"]["radii"][0]["unsat"] == 5 and not any(
        c["id"] == "verifier-beats-attacks" for c in doc["checks"])
    assert not (rep / "report.sigstore.json").exists()  # no stale signature beside the changed report


def test_export_spec_never_writes_into_a_folder_of_other_files(tmp_path):
    """A benchmark goes into a new or empty folder: not among a project's own files (README's tour once wrote into
    the repository's bench/), and not over another benchmark."""
    from evaluators.formal import export_spec
    from kit.errors import UserError

    out = tmp_path / "bench"
    out.mkdir()
    (out / "defenses.py").write_text("x = 1\n")
    with pytest.raises(UserError, match="holds other files"):
        export_spec({}, tmp_path / "m.onnx", out)
    assert sorted(p.name for p in out.iterdir()) == ["defenses.py"]
    (out / "defenses.py").unlink()
    (out / "vnnlib").mkdir()  # what an interrupted export leaves: its own folders, not yet its last two files
    with pytest.raises(UserError, match="unfinished benchmark"):
        export_spec({}, tmp_path / "m.onnx", out)
    (out / "otkit-spec.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a benchmark"):
        export_spec({}, tmp_path / "m.onnx", out)
    # an empty folder (dot-files aside) passes this check: what stops the call next is the (empty) report itself
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".gitkeep").write_text("")
    with pytest.raises(KeyError):
        export_spec({}, tmp_path / "m.onnx", empty)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["int8", "radius", "exists", "not-empty", "results-row", "other-report"])
def test_export_spec_and_fold_refuse_bad_input(audited, tmp_path, case):
    root, engine, int8, _ = audited
    if case == "int8":
        assert_user_error(run("export-spec", root / "audit", "--engine", int8, "--out", tmp_path / "b"), "int8",
                          "fp32")
    elif case == "radius":
        assert_user_error(run("export-spec", root / "audit", "--engine", engine, "--radius", "0.5", "--out",
                              tmp_path / "b"), "above the audit's L-inf eps_max")
    elif case == "exists":
        assert run("export-spec", root / "audit", "--engine", engine, "--out", tmp_path / "b").exit_code == 0
        assert_user_error(run("export-spec", root / "audit", "--engine", engine, "--out", tmp_path / "b"),
                          "already holds a benchmark")
    elif case == "not-empty":
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "notes.txt").write_text("mine\n")
        assert_user_error(run("export-spec", root / "audit", "--engine", engine, "--out", tmp_path / "b"),
                          "holds other files")
        assert [p.name for p in (tmp_path / "b").iterdir()] == ["notes.txt"]
    else:
        assert run("export-spec", root / "audit", "--engine", engine, "--out", tmp_path / "b").exit_code == 0
        bad = tmp_path / "r.csv"
        if case == "results-row":
            bad.write_text("onnx/model.onnx,vnnlib/ex0_r0.vnnlib,maybe\n")
            needle = "expected one result"
        else:
            manifest = json.loads((tmp_path / "b" / "otkit-spec.json").read_text())
            manifest["report"]["data"]["fingerprint"] = "sha256:" + "0" * 64
            (tmp_path / "b" / "otkit-spec.json").write_text(json.dumps(manifest))
            bad = _results(tmp_path / "b", {})
            needle = "another report"
        before = (root / "audit" / "report.json").read_bytes()
        assert_user_error(run("report", root / "audit", "--verifier-results", bad, "--spec", tmp_path / "b"), needle)
        assert (root / "audit" / "report.json").read_bytes() == before
