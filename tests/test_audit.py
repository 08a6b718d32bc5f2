"""The audit: twin-guided sweeps judged by the engine, fidelity statistics, verdicts, gates, resume and errors.

Engines are real ONNX files exported from models trained here on digits; statistics are checked against scipy and
hand-computed values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from evaluators import audit as A
from exporters.engines import TorchEngine, load_engine
from exporters.onnx import torch_to_onnx, write_onnx_export
from kit.attacks.search import SearchResult
from kit.checkpoint import load_twin
from kit.cli import cli
from kit.data import load_dataset
from kit.defenses.trainer import TrainConfig, train
from tests.clitools import verify_without_flag

SMALL = ["--samples", "40", "--batch-size", "20", "--rungs", "4", "--blackbox-samples", "20", "--allow-flag", "test-blind"]


@pytest.fixture(scope="module")
def engines(digits_model, tmp_path_factory):
    """The digits twin; fp32 and int8 ONNX files exported from it; fp32 and int8 ONNX files of a different model."""
    path, _ = digits_model
    folder = tmp_path_factory.mktemp("audit")
    other = train(TrainConfig(defense="standard", arch="cnn-small", data="digits:16", epochs=3, seed=11),
                  folder / "other.safetensors").path
    test = load_dataset("digits:16", "test").subset(64, seed=0)
    calib = load_dataset("digits:16", "train").subset(128, seed=0)
    files = {}
    for name, ckpt, precisions in (("twin", path, ("fp32", "int8")), ("other", other, ("fp32", "int8"))):
        model, info = load_twin(ckpt)
        graph = torch_to_onnx(model, info.input_shape, dynamo=False)
        for p in precisions:
            files[f"{name}-{p}"] = write_onnx_export(graph, folder / f"{name}-{p}.onnx", model, test.x, info=info,
                                                     parity_y=test.y, precision=p, calibration_x=calib.x).path
    return path, files


def audit_cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["-q", "audit", *map(str, args)])
    return res.exit_code, res.output


def read(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ------------------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (3, 3), (1, 9), (12, 40), (0, 25), (200, 260)])
def test_mcnemar_exact_is_the_two_sided_binomial_test(b, c):
    from scipy.stats import binomtest

    expected = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    assert A.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_fidelity_hand_computed():
    tol = A.Tolerances(auac=0.01, curve=0.02)
    twin = [0.1, 0.2, math.inf, 0.0]
    engine = [0.1, 0.3, math.inf, 0.0]
    f = A.fidelity(twin, engine, 0.4, tol, points=5)  # grid 0, .1, .2, .3, .4
    # AUAC: mean(min(eps*, 0.4)) / 0.4 -> twin 0.7/1.6, engine 0.8/1.6
    assert f["auac_gap"] == pytest.approx(0.1 / 1.6)
    # accuracy = share with eps* > eps; at eps 0.2 the twin has 1/4 (only inf), the engine 2/4
    assert f["max_gap"] == pytest.approx(0.25) and f["max_gap_eps"] == pytest.approx(0.2)
    assert f["mcnemar_p"] == [1.0] * 5  # one discordant pair at most
    assert f["verdict"] == "mismatch" and "AUAC gap" in f["reason"]
    lo, hi = f["auac_gap_ci"]
    assert 0 <= lo <= f["auac_gap"] <= hi <= 0.25  # every paired difference is 0 or 0.25
    same = A.fidelity(twin, twin, 0.4, tol, points=5)
    assert same["verdict"] == "match" and same["auac_gap"] == 0 and same["auac_gap_ci"] == [0, 0]


def test_curve_gap_needs_significance():
    """A curve gap above tolerance made of a couple of examples (McNemar p >= alpha) is noise, not a mismatch."""
    tol = A.Tolerances(auac=0.05, curve=0.02)
    twin = np.full(60, math.inf)
    engine = twin.copy()
    engine[:2] = 0.05  # 2 of 60 examples fooled on the engine only: gap 0.033 at eps 0.05
    f = A.fidelity(twin, engine, 0.1, tol, points=3)
    assert f["max_gap"] == pytest.approx(2 / 60) and f["verdict"] == "match"
    engine[:20] = 0.05  # 20 of 60: p = 2^-19
    f = A.fidelity(twin, engine, 0.1, A.Tolerances(auac=0.5, curve=0.02), points=3)
    assert f["mcnemar_p"][1] == pytest.approx(2 * 0.5**20) and f["verdict"] == "mismatch"
    assert "eps 0.05" in f["reason"]


def test_twin_guided_search_on_the_twin_itself(digits_model):
    """With the twin as the engine, both sides see the same verdicts: identical eps* and adversarials."""
    path, _ = digits_model
    model, info = load_twin(path)
    data = load_dataset("digits:16", "test").subset(24, seed=1)
    engine = TorchEngine(model, info.input_shape, info.num_classes, info.weights_sha256)
    rt, re_, nfe = A.twin_guided_search("pgd-linf", model, engine, data.x, data.y, 0.3, rungs=4)
    assert torch.equal(rt.eps_star, re_.eps_star) and torch.isfinite(rt.eps_star).sum() > 12
    assert torch.equal(rt.x_adv, re_.x_adv)
    assert nfe >= int(re_.forwards.sum())  # every candidate the engine-side search checked went through the engine


# --------------------------------------------------------------------------------------------------------- the CLI
def test_fp32_engine_matches_its_twin_and_gates_decide_the_status(engines, tmp_path):
    twin, files = engines
    out = tmp_path / "fp32"
    code, output = audit_cli("--engine", files["twin-fp32"], "--twin", twin, "--attack", "pgd-linf@0.3",
                             "--min-auac", "pgd-linf=0.99", *SMALL, "--out", out)
    doc = read(out)
    assert doc["verdict"] == "match" and doc["clean"]["top1_agreement"] == 1.0
    assert doc["engine"]["graph"]["status"] == "identical", doc["engine"]  # the twin exported again: the same bytes
    rec = doc["attacks"][0]
    assert abs(rec["fidelity"]["auac_gap"]) <= 1e-3 and rec["fidelity"]["max_gap"] <= 1 / 40
    assert len(rec["twin"]["eps_star"]) == len(rec["engine"]["eps_star"]) == doc["data"]["n"] == 40
    # the gate at 0.99 fails: status fail, exit 1, although the engine matches
    assert doc["gates"] == [{"attack": "pgd-linf", "min_auac": 0.99, "engine_auac": rec["engine"]["auac"],
                             "engine_auac_lower": rec["engine"]["auac_ci"][0], "passed": False}]
    assert doc["status"] == "fail" and code == 1, output
    # the report validates against the shipped schema, and the files are there
    from evaluators.report import load_report

    load_report(out)
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "report.html", "curves.png",
                                                "adversarials.npz"}
    assert not (out / A.STATE_DIR).exists()
    # the stored adversarials fool the engine as recorded, within their radius
    engine = load_engine(files["twin-fp32"])
    data = load_dataset("digits:16", "test").subset(40, seed=0)
    with np.load(out / "adversarials.npz") as z:
        x, y, idx, eps, pred = (z[f"pgd-linf/{k}"] for k in ("x", "y", "index", "eps", "pred"))
    assert len(x) == sum(e is not None for e in rec["engine"]["eps_star"]) > 0
    got = engine(torch.from_numpy(x)).argmax(1).numpy()
    assert (got == pred).all() and (pred != y).all() and (y == data.y.numpy()[idx]).all()
    linf = np.abs(x - data.x.numpy()[idx]).reshape(len(x), -1).max(1)
    assert (linf <= eps + 1e-6).all()


def test_engine_from_a_different_model_is_a_mismatch(engines, tmp_path):
    twin, files = engines
    out = tmp_path / "other"
    code, output = audit_cli("--engine", files["other-fp32"], "--twin", twin, "--attack", "pgd-linf@0.3", *SMALL,
                             "--out", out)
    doc = read(out)
    assert code == 1 and doc["verdict"] == "mismatch" and doc["status"] == "fail", output
    fid = doc["attacks"][0]["fidelity"]
    assert fid["verdict"] == "mismatch" and fid["max_gap"] > 0.02
    assert "mismatch" in output
    weights = [c for c in doc["checks"] if c["id"] == "engine-weights-differ"]
    assert len(weights) == 1 and weights[0]["severity"] == "error", doc["checks"]
    assert doc["twin"]["weights_sha256"] in weights[0]["message"]


def test_a_stale_int8_export_fails_on_the_weights_it_records(engines, tmp_path):
    """An int8 engine is judged on its agreement only; an int8 export of another checkpoint records that
    checkpoint's weights, which are not the twin's: an error flag, and the audit fails on it."""
    from exporters.engines import load_engine as load

    twin, files = engines
    _, info = load_twin(twin)
    other = load(files["other-int8"], "cpu")
    assert other.recorded_weights and other.recorded_weights != info.weights_sha256
    assert load(files["twin-int8"], "cpu").recorded_weights == info.weights_sha256
    out = tmp_path / "stale"
    code, output = audit_cli("--engine", files["other-int8"], "--twin", twin, "--attack", "pgd-linf@0.3", *SMALL,
                             "--out", out)
    doc = read(out)
    flagged = {c["id"] for c in doc["checks"]}
    assert "engine-weights-differ" in flagged and code == 1 and doc["status"] == "fail", output
    # the flag follows from the two files alone: verify raises it again, so a report edited to drop it fails
    res = verify_without_flag(out, "engine-weights-differ", tmp_path / "forged", files["other-int8"], twin)
    assert res.exit_code == 1 and "verify: checks: engine-weights-differ is raised again from the files" in \
        res.stderr, res.output


def test_a_twin_imported_from_a_kit_export_is_known_by_the_weights_it_records(engines):
    """``otkit models import`` of a kit export keeps the weights the file records: the int8 export of the same
    checkpoint is an export of that twin, another checkpoint's is not, and a file that records nothing is not
    compared."""
    from evaluators.checks import check_engine_weights
    from exporters.engines import load_engine as load
    from exporters.twins import TwinOptions, import_twin

    twin, files = engines
    _, info = load_twin(twin)
    imported = import_twin(files["twin-fp32"], TwinOptions())
    assert imported.info.source["recorded_weights_sha256"] == info.weights_sha256
    assert imported.info.dataset == info.dataset  # the export's record of its data: no --data needed to audit
    assert imported.info.weights_sha256 != info.weights_sha256  # the rebuilt module's own state dict
    mine, other = load(files["twin-int8"], "cpu"), load(files["other-int8"], "cpu")
    src = imported.info.source
    assert check_engine_weights(mine.recorded_weights, imported.info.weights_sha256, src, "m.onnx") is None
    assert check_engine_weights(other.recorded_weights, imported.info.weights_sha256, src, "m.onnx").id == \
        "engine-weights-differ"
    assert check_engine_weights("", info.weights_sha256, None, "m.onnx") is None
    old = {k: v for k, v in src.items() if k != "recorded_weights_sha256"}  # an import made before the record
    assert check_engine_weights(other.recorded_weights, imported.info.weights_sha256, old, "m.onnx") is None


class _NearOnly(torch.nn.Module):
    """The twin near the given examples (L-inf 0.35), the twin's logits rolled by one class elsewhere: an engine made
    to pass an audit whose examples its maker could draw in advance (a red-team's planted fault)."""

    def __init__(self, twin, anchors):
        super().__init__()
        self.twin, self.anchors = twin, anchors.flatten(1)

    def forward(self, x):
        out = self.twin(x)
        d = (x.flatten(1)[:, None] - self.anchors[None]).abs().amax(2).amin(1)
        return torch.where((d <= 0.35)[:, None], out, out.roll(1, dims=1))


def test_an_engine_that_matches_only_near_the_audited_examples_fails_the_spot_check(engines, tmp_path):
    """The audited subset is seeded (anyone can draw it); the spot check draws other examples from the split with a
    seed from the OS's entropy and records it. Without it this engine matches; with it, a clean mismatch, which
    verify's re-derivation agrees with and which a forged spot-check verdict does not survive."""
    from evaluators.recompute import recompute_report, rederive

    twin_path, _ = engines
    model, info = load_twin(twin_path)
    inputs = A.load_audit_inputs(twin_path, twin_path, None, "test", 30, 0, "cpu")
    assert inputs.pool is not None and len(inputs.pool) > 300
    inputs.engine = TorchEngine(_NearOnly(model, inputs.x), info.input_shape, info.num_classes, "sha256:" + "0" * 64)
    attacks = A.AttackRequest.parse_all(["pgd-linf@0.1:steps=5"], None)
    docs = {}
    for n in (0, 400):
        cfg = A.AuditConfig(attacks=attacks, batch_size=30, rungs=2, blackbox_samples=0, engine_only=False,
                            spot_check=n)
        docs[n], _ = A.run_audit(inputs, cfg, tmp_path / str(n))
    blind, seen = docs[0], docs[400]
    assert blind["clean"]["top1_agreement"] == 1.0 and blind["clean"]["verdict"] == "match"
    assert "spot_check" not in blind["clean"]
    spot = seen["clean"]["spot_check"]
    assert spot["n"] == 400 and spot["top1_agreement"] < 0.5 and spot["verdict"] == "mismatch"
    assert seen["clean"]["top1_agreement"] == 1.0  # the audited examples alone still agree
    assert seen["clean"]["verdict"] == "mismatch" and seen["clean"]["reason"].startswith("on 400 examples drawn")
    assert seen["verdict"] == "mismatch" and seen["status"] == "fail"
    # the spot check's examples are the split's, drawn again with the recorded seed
    assert inputs.pool.subset(400, seed=spot["seed"], notice=False).fingerprint == spot["fingerprint"]
    assert recompute_report(seen) == []
    forged = json.loads(json.dumps(seen))
    forged["clean"]["spot_check"]["verdict"] = forged["clean"]["verdict"] = "match"
    lines = recompute_report(forged)
    assert "clean.spot_check.verdict: report says match, recomputed mismatch" in lines
    assert "clean.verdict: report says match, recomputed mismatch" in lines
    # verify measures the report's spot check again, and draws one of its own: a report that drops its spot check
    # (consistent in itself: recompute finds nothing) does not escape
    from evaluators.replay import replay_report

    lines = replay_report(forged, inputs.engine, model, torch.device("cpu"))
    assert any(ln.startswith("clean.spot_check.verdict: report says match, measured again mismatch") for ln in lines)
    dropped = json.loads(json.dumps(forged))
    del dropped["clean"]["spot_check"]
    again = rederive(dropped)
    dropped.update(verdict=again["verdict"], status=again["status"], gates=again["gates"])
    assert recompute_report(dropped) == [] and dropped["verdict"] == "match"
    lines = replay_report(dropped, inputs.engine, model, torch.device("cpu"))
    assert len(lines) == 1 and lines[0].startswith("clean: on 449 examples verify drew at random from the split"), lines
    # a report whose spot check was shrunk to one example the engine gets right (seed searched for) recomputes and
    # replays as it says, but verify's own spot check is never smaller than the audit's default
    tols = A.Tolerances(**seen["tolerances"])
    one = next(r for r in (A.spot_check_record(model, inputs.engine, inputs.pool, 1, s, 30, tols, "cpu")
                           for s in range(200)) if r["verdict"] == "match")
    shrunk = json.loads(json.dumps(dropped))
    shrunk["clean"]["spot_check"] = one
    assert recompute_report(shrunk) == []
    lines = replay_report(shrunk, inputs.engine, model, torch.device("cpu"))
    assert lines and all(ln.startswith("clean: on 449 examples verify drew") for ln in lines), lines
    assert replay_report(seen, inputs.engine, model, torch.device("cpu")) == []  # the honest report verifies


def test_int8_verdict_follows_from_the_statistics(engines, tmp_path):
    """The stored verdict is what the tolerances say of the stored eps* (recomputed here), whatever it is."""
    twin, files = engines
    out = tmp_path / "int8"
    code, _ = audit_cli("--engine", files["twin-int8"], "--twin", twin, "--attack", "pgd-linf@0.3",
                        "--attack", "fmn-l2@3", *SMALL, "--out", out)
    doc = read(out)
    assert doc["engine"]["precision"] == "int8"
    assert doc["engine"]["graph"]["status"] == "equivalent", doc["engine"]  # its Q/DQ read back to the float graph
    tol = A.Tolerances(**doc["tolerances"])
    for rec in doc["attacks"]:
        as_inf = lambda v: [math.inf if e is None else e for e in v]  # noqa: E731
        again = A.fidelity(as_inf(rec["twin"]["eps_star"]), as_inf(rec["engine"]["eps_star"]), rec["eps_max"], tol)
        assert again == rec["fidelity"]
        sig = [g > tol.curve and p < tol.alpha for g, p in
               zip(np.abs(np.subtract(rec["engine"]["accuracy"], rec["twin"]["accuracy"])), rec["fidelity"]["mcnemar_p"])]
        expect = "mismatch" if abs(again["auac_gap"]) > tol.auac or any(sig) else "match"
        assert rec["fidelity"]["verdict"] == expect
    assert "engine-weights-differ" not in {c["id"] for c in doc["checks"]}
    clean_ok = doc["clean"]["top1_agreement"] >= tol.agreement
    assert doc["verdict"] == ("match" if clean_ok and all(r["fidelity"]["verdict"] == "match"
                                                          for r in doc["attacks"]) else "mismatch")
    assert code == (0 if doc["status"] == "pass" else 1)


def test_interrupted_audit_leaves_no_report_and_resumes(engines, tmp_path, monkeypatch):
    twin, files = engines
    args = ["--engine", files["twin-fp32"], "--twin", twin, "--attack", "pgd-linf@0.3", "--attack", "fmn-linf@0.3",
            *SMALL]
    full = tmp_path / "full"
    assert audit_cli(*args, "--min-auac", "pgd-linf=0.05", "--out", full)[0] == 0
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "report.json").write_text((full / "report.json").read_text())  # an old, complete report
    real, calls = A.twin_guided_search, []

    def interrupted(*a, **k):
        calls.append(a[0])
        if len(calls) == 3:  # pgd-linf's 2 batches done, fmn-linf's first batch interrupted
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(A, "twin_guided_search", interrupted)
    code, _ = audit_cli(*args, "--out", out)
    assert code != 0 and not (out / "report.json").exists() and not (out / "report.md").exists()
    assert sorted(p.name for p in (out / A.STATE_DIR).glob("*.npz")) == ["pgd-linf.000000.npz",
                                                                           "pgd-linf.000001.npz"]
    monkeypatch.setattr(A, "twin_guided_search", real)
    calls.clear()
    code, output = audit_cli(*args, "--min-auac", "pgd-linf=0.05", "--resume", "--out", out)
    assert code == 0, output
    a, b = read(full), read(out)
    assert [r["twin"]["eps_star"] for r in a["attacks"]] == [r["twin"]["eps_star"] for r in b["attacks"]]
    assert [r["engine"]["eps_star"] for r in a["attacks"]] == [r["engine"]["eps_star"] for r in b["attacks"]]
    # a changed configuration cannot resume
    (out / A.STATE_DIR).mkdir()
    (out / A.STATE_DIR / "key.json").write_text(json.dumps({"rungs": 99}))
    code, output = audit_cli(*args, "--resume", "--out", out)
    assert code == 2 and "changed" in output


def test_black_box_check_catches_a_blind_twin_guided_search(engines, tmp_path, monkeypatch):
    """If the twin-guided search finds nothing, Square on the engine does: the flag says so, and since the engine is
    the twin's exact export, it says the adversarials fool the twin too (a weak attack, not an unfaithful twin)."""
    twin, files = engines

    def blind(name, twin_model, engine, x, y, eps_max, **kw):
        none = SearchResult(torch.full((len(x),), math.inf, dtype=torch.float64), x.clone(),
                            torch.zeros(len(x), dtype=torch.long), torch.zeros(len(x), dtype=torch.long))
        return none, none, 0

    monkeypatch.setattr(A, "twin_guided_search", blind)
    out = tmp_path / "blind"
    code, output = audit_cli("--engine", files["twin-fp32"], "--twin", twin, "--attack", "pgd-linf@0.3", *SMALL,
                             "--out", out)
    flags = [f for f in read(out)["checks"] if f["id"] == "black-box-beats-white-box"]
    assert code == 0 and len(flags) == 1, output  # the curves still match: both sides saw the same (blind) search
    assert "fool the twin as well" in flags[0]["message"] and "fool only the engine" not in flags[0]["message"]


@pytest.mark.parametrize("extra,message", [
    (["--attack", "pgd-linf@-0.1"], "eps_max must be a positive"),
    (["--attack", "nope@0.1"], "unknown attack"),
    (["--attack", "pgd-linf@0.3", "--min-auac", "pgd-linf"], "bad gate"),
    (["--attack", "pgd-linf@0.3", "--min-auac", "fmn-l2=0.2"], "neither an audited attack"),
    (["--attack", "pgd-linf@0.3", "--data", "digits:8"], "takes inputs 1x16x16 but digits:8 has 1x8x8"),
    (["--attack", "pgd-linf@0.3", "--resume"], "nothing to resume"),
])
def test_user_errors_exit_2_with_one_line(engines, tmp_path, extra, message):
    twin, files = engines
    code, output = audit_cli("--engine", files["twin-fp32"], "--twin", twin, *extra, "--out", tmp_path / "o")
    assert code == 2 and message in output and output.strip().count("\n") == 0, output
    assert not (tmp_path / "o" / "report.json").exists()


def test_bad_engine_files_exit_2(engines, tmp_path):
    twin, _ = engines
    corrupt = tmp_path / "bad.onnx"
    corrupt.write_bytes(b"\x08\x07garbage")
    for engine in (corrupt, tmp_path / "missing.onnx"):
        code, output = audit_cli("--engine", engine, "--twin", twin, "--attack", "pgd-linf@0.3", "--out", tmp_path / "o")
        assert code == 2 and output.startswith("Error:") and output.strip().count("\n") == 0, output


def test_worst_case_is_the_per_example_minimum_over_attacks_and_the_black_box(engines, tmp_path):
    """The headline per norm: eps* per example is the smallest of any attack of that norm (and of the black box on
    the engine side); a gate on the norm compares the lower end of its interval."""
    import numpy as np

    from evaluators.recompute import eps_array, recompute_report

    twin, files = engines
    out = tmp_path / "w"
    code, output = audit_cli("--engine", files["twin-int8"], "--twin", twin, "--attack", "pgd-linf@0.3",
                             "--attack", "fmn-linf@0.3", "--attack", "fmn-l2@3", "--min-auac", "linf=0.01", *SMALL,
                             "--out", out)
    doc = read(out)
    by_norm = {w["norm"]: w for w in doc["worst_case"]}
    assert set(by_norm) == {"linf", "l2"}
    w = by_norm["linf"]
    per_attack = [eps_array(a["engine"]["eps_star"]) for a in doc["attacks"] if a["norm"] == "linf"]
    want = np.minimum(*per_attack)
    bb = np.array([np.inf if v is None else v for v in w["blackbox"]["eps"]])
    want[: bb.size] = np.minimum(want[: bb.size], bb)
    if w["engine_only"] is not None:  # an int8 engine: the differential attack's radii too
        want = np.minimum(want, eps_array(w["engine_only"]["eps"]))
    assert np.array_equal(eps_array(w["engine"]["eps_star"]), np.where(want <= 0.3, want, np.inf))
    assert all(w["engine"]["auac"] <= a["engine"]["auac"] + 1e-12 for a in doc["attacks"] if a["norm"] == "linf")
    assert "square-linf (black box)" in w["attacks"]
    gate = doc["gates"][0]
    assert gate["attack"] == "linf" and gate["engine_auac_lower"] == w["engine"]["auac_ci"][0]
    assert gate["passed"] == (w["engine"]["auac_ci"][0] >= 0.01)
    assert recompute_report(doc) == []
    # a forged worst case is caught by verify's recomputation
    forged = json.loads(json.dumps(doc))
    forged["worst_case"][0]["engine"]["auac"] += 0.1
    assert any("worst_case[0].engine.auac" in d for d in recompute_report(forged))


def test_worst_case_auac_is_never_above_any_single_attack():
    """Property over random eps* tables (with black-box radii): the worst case is a per-example minimum."""
    import numpy as np

    from evaluators.audit import worst_case_record

    rng = np.random.default_rng(0)
    for _ in range(200):
        n, k = int(rng.integers(1, 30)), int(rng.integers(1, 4))
        eps_max = float(rng.uniform(0.05, 1))
        tables = [np.where(rng.random(n) < 0.3, np.inf, rng.uniform(0, 1.2 * eps_max, n)) for _ in range(k)]
        nbb = int(rng.integers(0, n + 1))
        bb = {"attack": "square-linf", "queries": 1, "samples": nbb, "radii": [eps_max / 2, eps_max],
              "eps": [None if rng.random() < 0.5 else float(rng.choice([eps_max / 2, eps_max])) for _ in range(nbb)]}
        w = worst_case_record("linf", eps_max, [f"a{i}" for i in range(k)], tables, tables, bb, 9, 0)
        from evaluators.curves import auac

        assert all(w["engine"]["auac"] <= auac(t, eps_max) + 1e-12 for t in tables)
        assert all(w["twin"]["auac"] <= auac(t, eps_max) + 1e-12 for t in tables)


def test_engine_only_attack_on_int8_finds_what_twin_guided_search_misses(engines, tmp_path):
    """The differential attack on the int8 graph's fake-quant replica, judged by ONNX Runtime, finds engine-only
    adversarials (fool the engine, not the twin); they join the worst case, and verify re-derives it."""
    import onnx

    from evaluators.recompute import eps_array, recompute_report

    twin, files = engines
    out = tmp_path / "eo"
    audit_cli("--engine", files["twin-int8"], "--twin", twin, "--attack", "pgd-linf@0.3", *SMALL, "--out", out)
    doc = read(out)
    assert doc["replica"].startswith("the int8 graph with fake quantisation")
    w = doc["worst_case"][0]
    eo = w["engine_only"]
    assert w["attacks"][-1] == "differential-linf (engine-only)"
    assert eo["count"][-1] >= eo["twin_guided_count"][-1] and eo["count"][-1] > 0
    assert np.all(eps_array(w["engine"]["eps_star"]) <= eps_array(eo["eps"]))
    assert recompute_report(doc) == []
    # every engine-only adversarial radius is a real one: re-run the engine and the twin is not needed here; the
    # planted fault: an int8 file whose activation scales were tampered with disagrees with its twin near the
    # boundary, and the differential attack finds more engine-only adversarials there than the twin-guided search
    model = onnx.load(files["twin-int8"])
    scales = [i for i in model.graph.initializer if i.name.endswith("_scale") and i.dims == []]
    for t in scales[1:3]:
        arr = onnx.numpy_helper.to_array(t) * 1.5
        t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(arr.dtype), t.name))
    tampered = tmp_path / "tampered-int8.onnx"
    onnx.save(model, tampered)
    out2 = tmp_path / "eo2"
    audit_cli("--engine", tampered, "--twin", twin, "--attack", "pgd-linf@0.3", *SMALL, "--out", out2)
    eo2 = read(out2)["worst_case"][0]["engine_only"]
    assert eo2["count"][-1] > eo2["twin_guided_count"][-1]


def test_fp32_engines_need_no_replica(engines, tmp_path):
    twin, files = engines
    out = tmp_path / "fp"
    audit_cli("--engine", files["twin-fp32"], "--twin", twin, "--attack", "pgd-linf@0.3", *SMALL, "--out", out)
    doc = read(out)
    assert doc["replica"].startswith("none") and doc["worst_case"][0]["engine_only"] is None


def test_fp16_engines_are_searched_through_the_twin_in_half_precision(engines, tmp_path):
    from exporters.checkpoint import export_checkpoint

    twin, _ = engines
    fp16 = export_checkpoint(twin, "onnx-fp16", tmp_path / "m16.onnx").path
    out = tmp_path / "h"
    audit_cli("--engine", fp16, "--twin", twin, "--attack", "pgd-linf@0.3", *SMALL, "--out", out)
    doc = read(out)
    eo = doc["worst_case"][0]["engine_only"]
    assert doc["replica"] == "the twin in float16" and eo is not None
    assert len(eo["eps"]) == doc["data"]["n"] and eo["count"] == sorted(eo["count"])  # counts grow with the radius


def test_an_fp16_engine_is_held_to_the_rounding_of_float16(engines, tmp_path):
    """The clean logit gap of an fp16 engine has a tolerance, calibrated on the twin run in float16: the honest export
    is well within it; the same file with 1 added to every logit (its predictions unchanged, so the agreement cannot
    see it) is a mismatch, exit status 1, where it passed before."""
    import onnx

    from exporters.checkpoint import export_checkpoint

    twin, _ = engines
    fp16 = export_checkpoint(twin, "onnx-fp16", tmp_path / "m16.onnx").path
    model = onnx.load(fp16)
    out = model.graph.output[0]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(1, np.float32), "plus_one"))
    model.graph.node.append(onnx.helper.make_node("Add", [out.name, "plus_one"], ["shifted_logits"]))
    out.name = "shifted_logits"
    shifted = tmp_path / "m16-shifted.onnx"
    onnx.save(model, shifted)
    args = ["--twin", twin, "--attack", "pgd-linf@0.3", "--samples", "24", "--rungs", "2", "--blackbox-samples", "0",
            "--no-engine-only", "--allow-flag", "test-blind"]
    code, output = audit_cli("--engine", fp16, *args, "--out", tmp_path / "honest")
    clean = read(tmp_path / "honest")["clean"]
    assert code == 0, output
    assert clean["verdict"] == "match" and clean["max_logit_gap"] < clean["max_logit_gap_tolerance"] / 10
    code, output = audit_cli("--engine", shifted, *args, "--out", tmp_path / "shifted")
    clean = read(tmp_path / "shifted")["clean"]
    assert code == 1, output
    assert clean["top1_agreement"] == 1.0 and clean["verdict"] == "mismatch"
    assert abs(clean["max_logit_gap"] - 1.0) < 0.1 and "exceeds its tolerance" in clean["reason"]


def test_an_engine_with_nan_logits_fails_the_audit_and_gets_its_report(engines, tmp_path):
    """NaN logits: exit 1 (a clean mismatch) with every report file written and consistent, where the report's schema
    refused the infinite gap at the end (exit 2, a state folder left where there was none)."""
    import onnx

    twin, files = engines
    model = onnx.load(files["twin-fp32"])
    out = model.graph.output[0]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([np.nan], np.float32), "nan"))
    model.graph.node.append(onnx.helper.make_node("Add", [out.name, "nan"], ["nan_logits"]))
    out.name = "nan_logits"
    engine = tmp_path / "nan.onnx"
    onnx.save(model, engine)
    code, output = audit_cli("--engine", engine, "--twin", twin, "--attack", "pgd-linf@0.3", "--samples", "8",
                             "--rungs", "2", "--blackbox-samples", "0", "--no-engine-only", "--allow-flag",
                             "test-blind", "--out", tmp_path / "a")
    assert code == 1, output
    doc = read(tmp_path / "a")
    clean = doc["clean"]
    assert clean["verdict"] == "mismatch" and clean["max_logit_gap"] is None
    assert clean["max_logit_gap_tolerance"] == 0.0
    assert not (tmp_path / "a" / ".audit-state").exists()
    assert A.clean_judgement(1.0, 8, A.Tolerances(), None, 0.0)["reason"].startswith("the engine's clean logits are")


def test_a_tensorrt_int8_engine_is_replicated_from_the_graph_it_was_built_from(engines, tmp_path):
    """A TensorRT plan is not a graph: the sidecar names the Q/DQ ONNX file it was built from, and that file, beside
    the engine with the recorded sha256, is the replica's graph; anything else says why there is none. (No TensorRT
    is needed to read a sidecar; the replica built from the graph agrees with ONNX Runtime on the int8 file.)"""
    import hashlib
    import shutil

    from exporters.tensorrt.environment import SIDECAR_FORMAT
    from kit.twins.from_onnx import onnx_to_torch

    _, files = engines
    onnx_file = tmp_path / "m-int8.onnx"
    shutil.copy(files["twin-int8"], onnx_file)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    digest = "sha256:" + hashlib.sha256(onnx_file.read_bytes()).hexdigest()

    def sidecar(**onnx_record):
        side = {"format": SIDECAR_FORMAT, "tensorrt_version": "10.0", "gpu": {"name": "x"}, "precision": "int8",
                "engine_sha256": "sha256:0", "input_shape": [1, 16, 16], "num_classes": 10, "profile": {},
                "onnx": {"file": onnx_file.name, "sha256": digest, "precision": "int8", **onnx_record}}
        (tmp_path / "m.engine.json").write_text(json.dumps(side))

    sidecar()
    graph, why = A.int8_graph("tensorrt", engine)
    assert graph == onnx_file and onnx_file.name in why
    x = load_dataset("digits:16", "test").x[:32]
    ort = load_engine(onnx_file)
    with torch.no_grad():
        agree = (onnx_to_torch(graph, fake_quant=True)(x).argmax(1) == ort(x).argmax(1)).float().mean()
    assert agree >= 0.95
    for record, reason in (({"sha256": "sha256:" + "0" * 64}, "sha256 differs"),
                           ({"file": "../m-int8.onnx"}, "names no ONNX file"),
                           ({"file": "gone.onnx"}, "not beside it"),
                           ({"precision": "fp32"}, "fp32 ONNX file")):
        sidecar(**record)
        graph, why = A.int8_graph("tensorrt", engine)
        assert graph is None and why.startswith("none") and reason in why, why
    assert A.int8_graph("onnx", onnx_file)[0] == onnx_file
