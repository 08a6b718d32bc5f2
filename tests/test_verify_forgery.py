"""`otkit verify` against forged reports: every derived figure is recomputed, adversarials.npz is checked for content,
an ONNX engine's hash covers its external data, and checks left undone fail unless waived.

One real audit (the digits twin, an fp32 ONNX export whose weights live in an external data file, PGD on the 449 test examples (a few of
which the model gets wrong clean),
a gate the engine fails) is forged in the ways a release could be: the tests copy its folder and edit it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from kit.cli import cli

pytestmark = pytest.mark.slow  # trains the session's digits model (shared with other files)


def _export_external(model_path: Path, folder: Path) -> Path:
    """An fp32 ONNX export of the twin whose initializers live in ``model.onnx.data`` beside it."""
    from exporters.onnx import torch_to_onnx, write_onnx_export
    from kit.checkpoint import load_twin
    from kit.data import load_dataset

    model, info = load_twin(model_path)
    test = load_dataset("digits:16", "test").subset(32, seed=0)
    graph = torch_to_onnx(model, info.input_shape, dynamo=False)
    plain = write_onnx_export(graph, folder / "plain.onnx", model, test.x, info=info, parity_y=test.y,
                              precision="fp32").path
    proto = onnx.load(str(plain))
    onnx.external_data_helper.convert_model_to_external_data(proto, all_tensors_to_one_file=True,
                                                             location="model.onnx.data", size_threshold=1024)
    onnx.save(proto, str(folder / "model.onnx"))
    return folder / "model.onnx"


def run(*args) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, ["-q", *map(str, args)])
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def audited(digits_model, tmp_path_factory):
    """(report folder, engine, twin): a real audit of an external-data ONNX engine, status fail by a gate."""
    twin, _ = digits_model
    folder = tmp_path_factory.mktemp("forgery")
    engine = _export_external(twin, folder)
    with contextlib.chdir(folder):  # the audit itself needs no fix of the loader: it runs beside the file
        code, out, err = run("audit", "--engine", "model.onnx", "--twin", twin, "--attack", "pgd-linf@0.3",
                             "--samples", "449", "--batch-size", "449", "--rungs", "2", "--blackbox-samples", "0",
                             "--min-auac", "pgd-linf=0.99", "--out", folder / "rep")
    assert code == 1, out + err  # the gate fails: status fail
    doc = json.loads((folder / "rep" / "report.json").read_text())
    assert doc["status"] == "fail" and doc["verdict"] == "match" and not doc["gates"][0]["passed"]
    assert doc["clean"]["engine_accuracy"] < 1  # some examples wrong clean: what a 'perfect' forgery must hide
    return folder / "rep", engine, twin


@pytest.fixture()
def copy(audited, tmp_path):
    """A private copy of the report folder, its report.json as a dict, and a writer for the forged document."""
    rep, engine, twin = audited
    work = tmp_path / "rep"
    shutil.copytree(rep, work)
    doc = json.loads((work / "report.json").read_text())

    def save(d: dict) -> None:
        (work / "report.json").write_text(json.dumps(d, indent=1))

    return work, doc, save, engine, twin


def verify(work: Path, engine: Path, *extra) -> tuple[int, str, str]:
    return run("verify", work, "--engine", engine, *extra)


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------------ honest
def test_an_honest_report_verifies(copy):
    work, _, _, engine, twin = copy
    code, out, err = verify(work, engine, "--twin", twin)
    assert code == 0, out + err
    for item in ("engine sha256", "twin sha256", "adversarials sha256", "adversarials content", "recheck pgd-linf",
                 "derived figures"):
        assert any(line.startswith(item) and line.rstrip().endswith("match") for line in out.splitlines()), item
    assert err == ""
    code, out, _ = verify(work, engine, "--twin", twin, "--json")
    res = json.loads(out)
    assert code == 0 and res["match"] and res["waived"] == [] and res["recomputed"]["differences"] == []
    assert sum(r["checked"] for r in res["recheck"]) == 16  # the default --recheck


def test_recompute_of_the_honest_report_is_empty(copy):
    from evaluators.recompute import recompute_report
    from evaluators.report import load_report

    work, doc, *_ = copy
    assert doc["statistics"] == {"points": 33, "n_boot": 1000}
    assert recompute_report(load_report(work)) == []
    old = dict(doc)
    del old["statistics"]  # a report written before the field existed: the defaults are the audit's
    assert recompute_report(old) == []


# ---------------------------------------------------------------------------------------------------------- forgeries
def _edit_auac(d: dict) -> None:
    d["attacks"][0]["engine"]["auac"] = 0.9


def _status_pass(d: dict) -> None:  # a failed report made to pass, consistently enough for the schema
    d["status"] = "pass"
    d["gates"][0]["passed"] = True


def _gate_passed(d: dict) -> None:
    d["gates"][0]["passed"] = True


def _verdict_flip(d: dict) -> None:
    d["verdict"] = "mismatch"
    d["attacks"][0]["fidelity"]["verdict"] = "mismatch"


def _gap_edit(d: dict) -> None:
    d["attacks"][0]["fidelity"]["auac_gap_ci"] = [-0.001, 0.001]


@pytest.mark.parametrize("forge,named", [
    (_edit_auac, "attacks[0].engine.auac: report says 0.9, recomputed "),
    (_status_pass, "gates[0].passed: report says True, recomputed False"),
    (_gate_passed, "gates[0].passed: report says True, recomputed False"),
    (_verdict_flip, "attacks[0].fidelity.verdict: report says mismatch, recomputed match"),
    (_gap_edit, "attacks[0].fidelity.auac_gap_ci[0]: report says -0.001, recomputed "),
])
def test_forged_figures_are_recomputed(copy, forge, named):
    work, doc, save, engine, twin = copy
    forge(doc)
    save(doc)
    code, out, err = verify(work, engine, "--twin", twin)
    assert code == 1, out + err
    assert f"verify: {named}" in err
    assert "derived figures" in out and "DIFFERS" in out
    if forge is _status_pass:
        assert "verify: status: report says pass, recomputed fail" in err
    if forge is _verdict_flip:
        assert "verify: verdict: report says mismatch, recomputed match" in err


def test_a_mismatch_forged_into_a_match_is_caught(copy):
    """Per-example results that make a mismatch, presented with the verdicts of a match."""
    from evaluators.recompute import rederive

    work, doc, save, engine, twin = copy
    e = doc["attacks"][0]["engine"]["eps_star"]
    doc["attacks"][0]["engine"]["eps_star"] = [None if v is None else v / 2 for v in e]
    honest = rederive(doc)
    assert honest["verdict"] == "mismatch"
    for k in ("eps_grid", "twin", "engine"):
        doc["attacks"][0][k] = honest["attacks"][0][k]
    doc["gates"] = honest["gates"]
    fid = honest["attacks"][0]["fidelity"]
    doc["attacks"][0]["fidelity"] = {**fid, "verdict": "match", "reason": "AUAC gap within tolerance"}
    save(doc)
    code, out, err = verify(work, engine, "--twin", twin, "--waive", "adversarials")
    assert code == 1, out + err
    assert "verify: attacks[0].fidelity.verdict: report says match, recomputed mismatch" in err
    assert "verify: verdict: report says match, recomputed mismatch" in err


def test_swapped_adversarials_with_a_rewritten_hash(audited, copy):
    work, doc, save, engine, twin = copy

    def swap(field: str) -> None:
        with np.load(audited[0] / "adversarials.npz") as z:
            arrays = {k: z[k] for k in z.files}
        arrays[f"pgd-linf/{field}"] = np.ascontiguousarray(arrays[f"pgd-linf/{field}"][::-1])
        np.savez_compressed(work / "adversarials.npz", **arrays)
        doc["artifacts"]["adversarials_sha256"] = _sha(work / "adversarials.npz")
        save(doc)

    swap("index")  # another audit's adversarials: other examples at other radii
    code, out, err = verify(work, engine, "--twin", twin)
    assert code == 1, out + err
    assert "verify: adversarials.npz pgd-linf: example " in err and "but the report's engine eps_star is" in err
    assert "adversarials content" in out and "DIFFERS" in out
    swap("x")  # the report's examples, with the images of others: the content matches, the recheck does not
    code, out, err = verify(work, engine, "--twin", twin)
    assert code == 1, out + err
    assert "verify: recheck pgd-linf example " in err


def test_deleted_adversarials_fail_unless_waived(copy):
    work, _, _, engine, twin = copy
    (work / "adversarials.npz").unlink()
    code, out, err = verify(work, engine, "--twin", twin)
    assert code == 1, out + err
    assert "verify: adversarials not checked: " in err and "not beside the report" in err
    assert "NOT CHECKED" in out
    code, out, err = verify(work, engine, "--twin", twin, "--waive", "adversarials", "--json")
    res = json.loads(out)
    assert code == 0, out + err
    assert res["waived"] == ["adversarials"] and res["match"] is True
    assert "verify: waived: adversarials" in err


def test_missing_twin_or_recheck_fail_unless_waived(copy):
    work, _, _, engine, twin = copy
    code, out, err = verify(work, engine)
    assert code == 1, out + err
    assert "verify: twin not checked: give --twin" in err
    code, out, err = verify(work, engine, "--waive", "twin")
    assert code == 0, out + err
    assert "verify: waived: twin" in err
    assert any(line.startswith("twin sha256") and line.rstrip().endswith("waived") for line in out.splitlines())
    code, out, err = verify(work, engine, "--twin", twin, "--recheck", "0")
    assert code == 1 and "verify: recheck skipped (--recheck 0)" in err
    code, out, err = verify(work, engine, "--recheck", "0", "--waive", "recheck", "--waive", "twin", "--json")
    assert code == 0, out + err
    assert json.loads(out)["waived"] == ["twin", "recheck"] and "verify: waived: twin, recheck" in err


def test_external_weights_scaled_by_minus_3(copy):
    """The engine's weights edited in its external data file; report.json's engine sha256 left as it was."""
    work, doc, _, engine, twin = copy
    forged = work.parent / "engine"
    forged.mkdir()
    shutil.copy(engine, forged / "model.onnx")
    weights = np.fromfile(engine.parent / "model.onnx.data", dtype=np.float32)
    (weights * -3).astype(np.float32).tofile(forged / "model.onnx.data")
    assert _sha(forged / "model.onnx") == _sha(engine)  # the model file itself is untouched
    code, out, err = verify(work, forged / "model.onnx", "--twin", twin)
    assert code == 1, out + err
    assert "verify: engine sha256 differs: " in err
    assert "verify: recheck pgd-linf example " in err  # and the engine no longer does what the report says


def test_an_engine_swapped_for_one_with_scaled_logits_is_caught_on_the_clean_gap(copy):
    """Logits times 1.05: every prediction, every stored adversarial and every clean accuracy as before, so only the
    clean logit gap tells it from the audited engine. The forger swaps the file and rewrites its hash (an unsigned
    report); verify measures the clean comparison again."""
    from exporters.onnx import engine_sha256

    work, doc, save, engine, twin = copy
    proto = onnx.load(str(engine))  # its external data read from beside it
    out = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [f"{o}_raw" if o == out else o for o in node.output]
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.05, dtype=np.float32), "scale_105"))
    proto.graph.node.append(onnx.helper.make_node("Mul", [f"{out}_raw", "scale_105"], [out]))
    scaled = work.parent / "scaled.onnx"
    onnx.save(proto, str(scaled))
    doc["engine"]["sha256"] = engine_sha256(scaled)
    save(doc)
    code, out_text, err = verify(work, scaled, "--twin", twin, "--waive", "adversarials")
    assert code == 1, out_text + err
    assert "verify: clean.max_logit_gap: report says " in err and "measured again" in err
    assert "verify: clean.verdict: report says match, measured again mismatch: clean max logit gap" in err
    assert "clean.engine_accuracy" not in err  # the predictions are the engine's: only the gap tells


def test_the_spot_check_is_drawn_again_and_measured_again(copy):
    """The report records the spot check's seed and fingerprint: verify draws the same examples and compares them
    as the audit did; another seed, or a figure edited, is a difference."""
    work, doc, save, engine, twin = copy
    spot = doc["clean"]["spot_check"]
    assert spot["n"] > 100 and spot["verdict"] == "match"
    forged = json.loads(json.dumps(doc))
    forged["clean"]["spot_check"]["fingerprint"] = "sha256:" + "1" * 64
    save(forged)
    code, out, err = verify(work, engine, "--twin", twin)
    assert code == 1 and "verify: clean.spot_check.fingerprint: the " in err, out + err
    forged = json.loads(json.dumps(doc))
    forged["clean"]["spot_check"]["top1_agreement"] = 0.5
    save(forged)
    code, out, err = verify(work, engine, "--twin", twin)
    assert code == 1 and "verify: clean.spot_check.top1_agreement: report says 0.5, the engine and the twin " \
        "agree on" in err, out + err


def test_a_loosened_gap_tolerance_is_caught(copy):
    work, doc, save, engine, twin = copy
    doc["clean"]["max_logit_gap_tolerance"] = 100.0
    save(doc)
    code, out, err = verify(work, engine, "--twin", twin)
    assert code == 1, out + err
    assert "verify: clean.max_logit_gap_tolerance: report says 100.0, the audit sets " in err


# ------------------------------------------------------------------------------------------------ ONNX external data
def test_external_data_onnx_loads_from_any_folder(audited, tmp_path, monkeypatch):
    from exporters.engines import load_engine
    from exporters.onnx import describe_onnx, engine_sha256

    _, engine, _ = audited
    monkeypatch.chdir(tmp_path)
    eng = load_engine(engine)
    assert eng.sha256 == engine_sha256(engine) != _sha(engine)  # the external data is in the hash
    info = describe_onnx(engine)
    assert info["sha256"] == eng.sha256 and info["checks"]["checker_full"] == "pass"
    assert [e["location"] for e in info["external_data"]] == ["model.onnx.data"]
    code, out, err = run("engine", "info", engine)
    assert code == 0 and eng.sha256 in out, out + err
    code, out, err = run("engine", "run", engine, "--data", "digits:16", "--samples", "20")
    assert code == 0, out + err


def test_plain_onnx_hash_is_the_file_hash(audited, tmp_path):
    from exporters.onnx import engine_sha256

    plain = audited[1].parent / "plain.onnx"
    assert engine_sha256(plain) == _sha(plain)


def test_external_data_outside_the_model_folder_is_refused(audited, tmp_path):
    from exporters.engines import load_engine
    from exporters.onnx import engine_sha256
    from kit.errors import UserError

    _, engine, _ = audited
    (tmp_path / "sub").mkdir()
    shutil.copy(engine.parent / "model.onnx.data", tmp_path / "model.onnx.data")
    proto = onnx.load(str(engine), load_external_data=False)
    for t in onnx.external_data_helper._get_all_tensors(proto):
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../model.onnx.data"
    onnx.save(proto, str(tmp_path / "sub" / "evil.onnx"))
    for fn in (load_engine, engine_sha256):
        with pytest.raises(UserError, match="outside the model's folder"):
            fn(tmp_path / "sub" / "evil.onnx")


# ------------------------------------------------------------------------------ forgeries consistent in themselves
def _consistent(work: Path, d: dict, z: dict[str, np.ndarray]) -> None:
    """Write a forged report whose every derived figure, and adversarials.npz with its hash, agree with its eps*:
    what a forger does who has the kit (recompute finds nothing; only the data and the models can)."""
    from evaluators.recompute import rederive

    r = rederive(d)
    for a, ra in zip(d["attacks"], r["attacks"]):
        a["eps_grid"] = ra["eps_grid"]
        for side in ("twin", "engine"):
            a[side].update({k: ra[side][k] for k in ("accuracy", "auac", "auac_ci")})
        a["fidelity"].update({k: ra["fidelity"][k] for k in ("max_gap", "max_gap_eps", "auac_gap", "auac_gap_ci",
                                                              "mcnemar_p", "verdict")})
    d["clean"]["verdict"] = r["clean"]["verdict"]
    if "worst_case" in d:
        d["worst_case"] = json.loads(json.dumps(r["worst_case"]))
    d["gates"] = [dict(g, **{k: rg[k] for k in ("engine_auac", "engine_auac_lower", "passed") if k in rg})
                  for g, rg in zip(d["gates"], r["gates"])]
    d["verdict"], d["status"] = r["verdict"], r["status"]
    np.savez(work / "adversarials.npz", **z)
    d["artifacts"]["adversarials_sha256"] = _sha(work / "adversarials.npz")
    (work / "report.json").write_text(json.dumps(d, indent=1))


def _keep(z: dict[str, np.ndarray], name: str, eps_by_index: dict[int, float]) -> None:
    keep = np.array([int(i) in eps_by_index for i in z[f"{name}/index"]], dtype=bool)
    for k in ("x", "y", "index", "eps", "pred"):
        z[f"{name}/{k}"] = z[f"{name}/{k}"][keep]
    z[f"{name}/eps"] = np.array([eps_by_index[int(i)] for i in z[f"{name}/index"]], dtype=np.float64)


def _perfect(d: dict, z: dict) -> None:
    """Every example robust and every clean prediction right: AUAC 1, the gate passes."""
    a = d["attacks"][0]
    for side in ("twin", "engine"):
        a[side]["eps_star"] = [None] * len(a[side]["eps_star"])
    _keep(z, a["name"], {})
    d["clean"].update(twin_accuracy=1.0, engine_accuracy=1.0)


def _inflate(d: dict, z: dict) -> None:
    """Every eps* tripled (below eps_max), the stored eps with it: the adversarials are kept, now 'smaller'."""
    a = d["attacks"][0]
    for side in ("twin", "engine"):
        a[side]["eps_star"] = [v if not v else min(3 * v, 0.999 * a["eps_max"]) for v in a[side]["eps_star"]]
    _keep(z, a["name"], {i: v for i, v in enumerate(a["engine"]["eps_star"]) if v is not None})


def _beyond_the_box(d: dict, z: dict) -> None:
    """An L-inf curve out to eps 50 on [0, 1] pixels (the audit refuses it; a forger need not ask)."""
    a = d["attacks"][0]
    a["eps_max"] = 50.0


@pytest.mark.parametrize("forge,named", [
    (_perfect, "misclassified clean by the engine but stored with eps* > 0"),
    (_inflate, "lie at another distance from their clean example than their stored eps*"),
    (_beyond_the_box, "attacks[pgd-linf].eps_max: 50 is beyond 1"),
])
def test_a_forgery_consistent_in_itself_is_caught_on_the_data(copy, forge, named):
    from evaluators.recompute import recompute_report

    work, doc, _, engine, twin = copy
    z = dict(np.load(work / "adversarials.npz"))
    forge(doc, z)
    _consistent(work, doc, z)
    assert recompute_report(json.loads((work / "report.json").read_text())) == []  # nothing left to recompute
    code, out, err = verify(work, engine, "--twin", twin)
    assert code == 1, out + err
    assert named in err
    assert "audited examples" in out and "DIFFERS" in out


def test_perfect_forgery_states_the_real_clean_accuracy(copy):
    work, doc, _, engine, twin = copy
    real = doc["clean"]["engine_accuracy"]
    z = dict(np.load(work / "adversarials.npz"))
    _perfect(doc, z)
    _consistent(work, doc, z)
    _, _, err = verify(work, engine, "--twin", twin)
    assert "clean.engine_accuracy: report says 1.0, the engine classifies" in err and f"({real:.4f})" in err


def test_other_data_is_refused_and_data_can_be_waived(copy):
    work, doc, save, engine, twin = copy
    doc["data"]["fingerprint"] = "sha256:" + "0" * 64
    save(doc)
    code, _, err = verify(work, engine, "--twin", twin)
    assert code == 2 and "fingerprint" in err  # other data is an input error: nothing to compare against
    code, out, err = verify(work, engine, "--twin", twin, "--waive", "data")
    assert code == 0, out + err
    assert "verify: waived: data" in err


def test_nothing_to_recheck_is_not_a_pass(copy):
    work, doc, _, engine, twin = copy
    z = dict(np.load(work / "adversarials.npz"))
    _keep(z, doc["attacks"][0]["name"], {})
    np.savez(work / "adversarials.npz", **z)
    code, _, err = verify(work, engine, "--twin", twin, "--waive", "data")
    assert code == 1 and "recheck had nothing to run" in err
