"""``otkit certify``: randomized-smoothing certificates of deployed engines (real ONNX Runtime sessions), their files,
their re-derivation, reproducibility, resume and bad input.

The bounds and radii themselves are checked against closed forms and scipy in tests/test_smoothing.py; here the
engine-level command is checked against what those functions give, and engines of one model against each other.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from evaluators import certify as CE
from evaluators.certificate import load_certificate, recompute_certificate
from tests.clitools import assert_user_error, run

BASE = ["--sigma", "0.25", "--n0", "32", "--n", "400", "--samples", "12", "--batch-size", "5", "--noise-batch", "128"]


@pytest.fixture(scope="module")
def exported(digits_model, tmp_path_factory):
    """The digits twin and its fp32, fp16 and int8 ONNX exports."""
    from exporters.checkpoint import export_checkpoint

    path, _ = digits_model
    folder = tmp_path_factory.mktemp("certify")
    files = {p: export_checkpoint(path, f"onnx-{p}" if p != "fp32" else "onnx", folder / f"m-{p}.onnx").path
             for p in ("fp32", "fp16", "int8")}
    return path, files


def certify_cli(*args):
    return run("-q", "certify", *map(str, args))


def test_a_certificate_of_an_onnx_engine_rederives_from_its_counts(exported, tmp_path):
    twin, files = exported
    out = tmp_path / "c"
    res = certify_cli("--engine", files["fp32"], "--data", "digits:16", *BASE, "--out", out)
    assert res.exit_code == 0, res.output
    doc = load_certificate(out)
    assert sorted(p.name for p in out.iterdir()) == ["certificate.html", "certificate.json", "certificate.md",
                                                     "certified.png"]
    assert doc["bound"] == CE.CERTIFIED_BOUND and doc["attack"] is None and doc["data"]["n"] == 12
    assert recompute_certificate(doc) == []
    # the ceiling n allows, and the curve starts at the smoothed accuracy (every correct example has R >= 0)
    from scipy.stats import norm

    assert doc["smoothing"]["max_radius"] == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 400)), rel=1e-12)
    assert doc["certified"]["accuracy"][0] == pytest.approx(doc["certified"]["smoothed_accuracy"])
    assert "certified lower bound" in (out / "certificate.md").read_text()
    assert "empirical upper bound" not in (out / "certificate.md").read_text()  # no attack ran
    # an edited figure is caught by the re-derivation
    forged = json.loads((out / "certificate.json").read_text())
    forged["examples"]["radius"][0] += 0.1
    forged["certified"]["auac"] = min(1.0, forged["certified"]["auac"] + 0.05)
    problems = recompute_certificate(forged)
    assert any(p.startswith("examples.radius[0]") for p in problems) and any("certified.auac" in p for p in problems)


def test_counts_are_the_engines_own_under_the_seeded_noise(exported, tmp_path):
    """The command's counts equal CERTIFY run by hand on the same engine, noise seeds and examples."""
    from exporters.engines import load_engine
    from kit.data import load_dataset
    from kit.smoothing import certify, example_generator, make_noise

    _, files = exported
    inp = CE.load_certify_inputs(files["fp32"], None, "digits:16", "test", 6, 0, "cpu")
    cfg = CE.CertifyConfig(smoothing="gaussian", sigma=0.25, n=300, n0=32, noise_batch=100, batch_size=4)
    doc = CE.run_certify(inp, cfg, tmp_path / "c")
    engine = load_engine(files["fp32"], "cpu")
    x = load_dataset("digits:16", "test").subset(6, seed=0).x
    noise = make_noise("gaussian", 0.25)
    for j in range(6):
        c = certify(lambda b: engine(b).argmax(1), x[j], noise, 32, 300, 0.001, 64, example_generator(0, j, "cpu"),
                    10)
        assert (c.prediction, c.count) == (doc["examples"]["prediction"][j], doc["examples"]["count"][j])


def test_twin_fp32_and_fp16_certify_alike_and_int8_has_its_own(exported, tmp_path):
    """The same seeded noise through the twin (torch), the fp32 and the fp16 ONNX: the same smoothed predictions and
    counts within a few samples of n (fp16 rounding moves the odd sample across a boundary); int8 is reported as
    its own certificate."""
    twin, files = exported
    docs = {}
    for name, engine in (("twin", twin), ("fp32", files["fp32"]), ("fp16", files["fp16"]), ("int8", files["int8"])):
        res = certify_cli("--engine", engine, "--data", "digits:16", *BASE, "--json", "--out", tmp_path / name)
        assert res.exit_code == 0, res.output
        docs[name] = json.loads(res.stdout)
    ref = docs["twin"]["examples"]
    for name in ("fp32", "fp16"):
        ex = docs[name]["examples"]
        assert ex["prediction"] == ref["prediction"]
        diff = np.abs(np.array(ex["count"]) - np.array(ref["count"]))
        assert diff.max() <= (0 if name == "fp32" else 8), (name, diff)
        assert docs[name]["certified"]["auac"] == pytest.approx(docs["twin"]["certified"]["auac"], abs=0.02)
    assert docs["int8"]["engine"]["precision"] == "int8" and recompute_certificate(docs["int8"]) == []


def test_interrupted_certificate_resumes_to_the_same_numbers(exported, tmp_path, monkeypatch):
    _, files = exported
    args = ["--engine", files["fp32"], "--data", "digits:16", *BASE, "--json"]
    full = certify_cli(*args, "--out", tmp_path / "full")
    out = tmp_path / "cut"
    import kit.smoothing as S  # the loop calls kit.smoothing.certify, once per example

    calls = {"n": 0}
    original = S.certify

    def dies_after_six(*a, **k):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(S, "certify", dies_after_six)
    res = certify_cli(*args, "--out", out)
    assert res.exit_code != 0 and not (out / "certificate.json").exists()
    assert sorted(p.name for p in (out / CE.STATE_DIR).glob("*.npz")) == ["certify.000000.npz"]
    monkeypatch.setattr(S, "certify", original)
    # kept batches drew their noise on this device: another device's stream would give other numbers
    with monkeypatch.context() as m:
        m.setattr(S, "noise_stream", lambda device: "cuda (132 multiprocessors x 2048 threads)")
        line = assert_user_error(certify_cli(*args, "--resume", "--out", out))
    assert "noise_stream" in line, line
    res = certify_cli(*args, "--resume", "--out", out)
    assert res.exit_code == 0, res.output
    a, b = json.loads(full.stdout), json.loads(res.stdout)
    assert a["examples"] == b["examples"] and a["certified"] == b["certified"]
    assert not (out / CE.STATE_DIR).exists()
    res = certify_cli(*args, "--n", "401", "--resume", "--out", out)
    assert_user_error(res, "nothing to resume")


@pytest.mark.parametrize("extra, needle", [
    (["--sigma", "0"], "sigma"),
    (["--sigma", "-0.5"], "sigma"),
    (["--sigma", "nan"], "sigma"),
    (["--alpha", "1.5"], "alpha"),
    (["--alpha", "0"], "alpha"),
    (["--r-max", "-1"], "r-max"),
    (["--min-certified-auac", "2"], "min-certified-auac"),
])
def test_bad_parameters_exit_2_with_one_line(exported, tmp_path, extra, needle):
    _, files = exported
    args = ["--engine", files["fp32"], "--data", "digits:16", *BASE, *extra, "--out", tmp_path / "o"]
    res = run("certify", *map(str, args))
    assert_user_error(res, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, needle", [(["--n0", "0"], "--n0"), (["--n", "0"], "--n")])
def test_counts_below_one_are_usage_errors(exported, tmp_path, extra, needle):
    _, files = exported
    res = run("certify", "--engine", str(files["fp32"]), "--data", "digits:16", "--sigma", "0.25", *extra,
              "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and needle in res.stderr and "Traceback" not in res.output


def test_missing_data_and_files_exit_2(exported, tmp_path):
    _, files = exported
    assert_user_error(run("certify", "--engine", str(files["fp32"]), "--sigma", "0.25", "--out", str(tmp_path / "o")),
                      "--data")
    assert_user_error(run("certify", "--engine", str(tmp_path / "nope.onnx"), "--data", "digits:16", "--sigma", "0.25",
                          "--out", str(tmp_path / "o")))


class _Noisy(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        return y + torch.randn_like(y)


def test_a_randomised_engine_fails_unless_allowed(digits_model, tmp_path):
    from kit.checkpoint import load_twin

    twin, info = load_twin(digits_model[0])
    path = tmp_path / "noisy.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Noisy(twin).eval(), (torch.rand(2, *info.input_shape),), str(path), dynamo=False,
                          opset_version=18, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    args = ["--engine", path, "--data", "digits:16", *BASE, "--json"]
    res = certify_cli(*args, "--out", tmp_path / "a")
    doc = json.loads(res.stdout)
    assert res.exit_code == 1 and doc["status"] == "fail"
    assert [c["id"] for c in doc["checks"] if c["severity"] == "error"] == ["randomised-outputs"]
    res = certify_cli(*args, "--allow-flag", "randomised-outputs", "--out", tmp_path / "b")
    assert res.exit_code == 0 and json.loads(res.stdout)["allowed_flags"] == ["randomised-outputs"]


def test_gate_on_the_certified_auac(exported, tmp_path):
    _, files = exported
    args = ["--engine", files["fp32"], "--data", "digits:16", *BASE, "--json"]
    res = certify_cli(*args, "--min-certified-auac", "0.99", "--out", tmp_path / "g")
    doc = json.loads(res.stdout)
    assert res.exit_code == 1 and doc["gates"][0]["passed"] is False and recompute_certificate(doc) == []
    assert "The certificate fails: certified AUAC" in (tmp_path / "g" / "certificate.md").read_text()


SANDWICH = ["--sigma", "0.25", "--n0", "32", "--n", "500", "--samples", "10", "--batch-size", "10",
            "--noise-batch", "250", "--attack-n", "200", "--json"]


def test_the_sandwich_certified_below_attack_and_no_violation(exported, tmp_path):
    """With a twin, the smoothed engine is attacked (SmoothAdv: PGD on the soft smoothed twin, judged by the
    engine's PREDICT): its curve lies above the certified one at every radius, and nothing beats a certificate."""
    twin, files = exported
    res = certify_cli("--engine", files["fp32"], "--twin", twin, *SANDWICH, "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    a, c = doc["attack"], doc["certified"]
    assert a["name"] == "smoothadv-pgd-l2" and a["bound"] == "empirical upper bound from attacks"
    assert a["eps_grid"] == c["radius_grid"] and a["violations"] == []
    assert all(up >= lo for up, lo in zip(a["accuracy"], c["accuracy"]))
    assert a["accuracy"][-1] < 1  # the attack does fool the smoothed engine somewhere below r_max
    # every fooled example was fooled by a real point: eps* is its L2 distance, within the last rung
    assert all(e is None or 0 <= e <= a["radii"][-1] + 1e-6 for e in a["eps_star"])
    assert "empirical upper bound" in (tmp_path / "s" / "certificate.md").read_text()
    assert recompute_certificate(doc) == []
    # a hand-edited attack curve, status, bound text or summary figure is caught by the re-derivation
    import copy

    for edit, field in ((lambda d: d["attack"].update(auac=0.99), "attack.auac"),
                        (lambda d: d["attack"]["accuracy"].__setitem__(10, 0.1), "attack.accuracy"),
                        (lambda d: d["attack"].update(bound="certified"), "attack.bound"),
                        (lambda d: d.update(status="fail"), "status"),
                        (lambda d: d.update(bound="exact robustness"), "bound"),
                        (lambda d: d["certified"].update(mean_radius=1.0), "certified.mean_radius")):
        forged = copy.deepcopy(doc)
        edit(forged)
        assert any(line.startswith(field) for line in recompute_certificate(forged)), field
    # a count raised after the attack ran: the radius grows past the eps* the attack found on that example, where the
    # certificate records no violation; the document alone shows it, whichever examples a replay would draw
    ex = doc["examples"]
    fooled = [i for i, e in enumerate(a["eps_star"]) if e is not None and ex["prediction"][i] == ex["label"][i]]
    j = min(fooled, key=lambda i: a["eps_star"][i])
    forged = _forge_count(tmp_path / "s", tmp_path / "raised", j, doc["smoothing"]["n"], consistent=False)
    assert forged["examples"]["radius"][j] > a["eps_star"][j] > doc["examples"]["radius"][j]
    lines = recompute_certificate(forged)
    assert lines == [f"attack.violations: example {j} was fooled at {a['eps_star'][j]:.6g} (attack.eps_star), inside "
                     f"its certified radius {forged['examples']['radius'][j]:.6g}, but the certificate records no "
                     "violation there"], lines
    res = run("-q", "verify", str(tmp_path / "raised"), "--engine", str(files["fp32"]), "--twin", str(twin),
              "--recheck", "1")
    assert res.exit_code == 1 and f"verify: attack.violations: example {j} was fooled" in res.stderr, res.output


def test_an_inflated_certificate_is_caught_by_the_attack(exported, tmp_path, monkeypatch):
    """Planted fault: radii 50x what the bound allows. The attack then finds points inside 'certified' balls that
    the smoothed engine puts in another class: certificate-violated, exit 1."""
    from kit.smoothing.noise import GaussianNoise

    twin, files = exported
    real = GaussianNoise._radius
    monkeypatch.setattr(GaussianNoise, "_radius", lambda self, p: 50 * real(self, p))
    res = certify_cli("--engine", files["fp32"], "--twin", twin, *SANDWICH, "--r-max", "2", "--out", tmp_path / "v")
    doc = json.loads(res.stdout)
    assert res.exit_code == 1 and doc["status"] == "fail"
    assert [c["id"] for c in doc["checks"]] == ["certificate-violated"] and doc["attack"]["violations"]
    v = doc["attack"]["violations"][0]
    assert v["eps"] < v["radius"] and v["attacked_class"] != v["certified_class"]


def _forge_count(src, dst, j: int, count: int, prediction: int | None = None, consistent: bool = True) -> dict:
    """A copy of the certificate folder ``src`` at ``dst`` whose example ``j`` says ``count`` (and ``prediction``),
    with every figure derived from it re-derived (so that only a replay can see the forgery); returns the forged
    document."""
    import shutil

    from evaluators.certificate import certified_curve
    from kit.smoothing import lower_confidence_bound, make_noise

    shutil.copytree(src, dst)
    doc = json.loads((dst / "certificate.json").read_text())
    doc["examples"]["count"][j] = count
    if prediction is not None:
        doc["examples"]["prediction"][j] = prediction
    sm = doc["smoothing"]
    doc["examples"]["p_lower"][j] = float(lower_confidence_bound(count, sm["n"], sm["alpha"]))
    r = float(make_noise("gaussian", sm["sigma"]).radius(doc["examples"]["p_lower"][j]))
    doc["examples"]["radius"][j] = r
    if r == 0:
        doc["examples"]["prediction"][j] = -1
    label = np.array(doc["examples"]["label"])
    pred = np.array(doc["examples"]["prediction"])
    curve = certified_curve(np.array(doc["examples"]["radius"]), pred == label, doc["certified"]["r_max"],
                            len(doc["certified"]["radius_grid"]))
    radii = np.array(doc["examples"]["radius"])
    doc["certified"].update(accuracy=curve["accuracy"], auac=curve["auac"],
                            smoothed_accuracy=float((pred == label).mean()), abstain_rate=float((pred < 0).mean()),
                            mean_radius=float(np.where(pred == label, radii, 0.0).mean()))
    (dst / "certificate.json").write_text(json.dumps(doc))
    if consistent:
        assert recompute_certificate(doc) == []  # consistent with itself
    return doc


def test_verify_checks_a_certificate_against_its_engine_counts_and_data(exported, tmp_path):
    twin, files = exported
    out = tmp_path / "c"
    assert certify_cli("--engine", files["fp32"], "--data", "digits:16", *BASE, "--out", out).exit_code == 0
    res = run("-q", "verify", str(out), "--engine", str(files["fp32"]), "--recheck", "3", "--json")
    body = json.loads(res.stdout)
    assert res.exit_code == 0 and body["match"], res.output
    note = body["replayed"]["note"]
    assert note.startswith("3 example(s) certified again (the same noise); drawn at random: "), note
    drawn = [int(v) for v in note.split(": ")[-1].split(", ")]
    assert len(set(drawn)) == 3 and all(0 <= j < 12 for j in drawn)
    assert json.loads((out / "certificate.json").read_text())["provenance"]["noise_stream"] == "cpu"
    # another engine (the fp16 file) fails the hash, and certified again its counts may move; a forged count fails
    res = run("-q", "verify", str(out), "--engine", str(files["int8"]), "--recheck", "12")
    assert res.exit_code == 1 and "engine sha256 differs" in res.stderr
    doc = json.loads((out / "certificate.json").read_text())
    j = next(i for i, p in enumerate(doc["examples"]["prediction"]) if p >= 0)
    _forge_count(out, tmp_path / "forged", j, max(0, doc["examples"]["count"][j] - 40))
    res = run("-q", "verify", str(tmp_path / "forged"), "--engine", str(files["fp32"]), "--recheck", "12")
    assert res.exit_code == 1 and f"examples[{j}]: certified again" in res.stderr  # ... but not with the engine


def test_verify_on_another_device_compares_counts_within_sampling_error(exported, tmp_path, monkeypatch):
    """A certificate whose noise this device cannot draw again (a GPU's, checked elsewhere; simulated by another stream
    name and other seeds): an honest certificate passes within sampling error, a forged count still fails."""
    import kit.smoothing

    twin, files = exported
    out = tmp_path / "c"
    assert certify_cli("--engine", files["fp32"], "--data", "digits:16", *BASE, "--out", out).exit_code == 0
    doc = json.loads((out / "certificate.json").read_text())
    n = doc["smoothing"]["n"]
    j = next(i for i, c in enumerate(doc["examples"]["count"]) if c >= 0.95 * n)
    _forge_count(out, tmp_path / "forged", j, int(0.7 * n))  # still certified, with a smaller radius
    real = kit.smoothing.example_generator
    monkeypatch.setattr(kit.smoothing, "noise_stream", lambda device: "cuda (132 multiprocessors x 2048 threads)")
    monkeypatch.setattr(kit.smoothing, "example_generator", lambda seed, i, device: real(seed + 7919, i, device))
    res = run("-q", "verify", str(out), "--engine", str(files["fp32"]), "--recheck", "12", "--json")
    body = json.loads(res.stdout)
    assert res.exit_code == 0 and body["match"], res.output
    assert body["replayed"]["note"].startswith("12 example(s) certified again (new noise: cpu drew")
    res = run("-q", "verify", str(tmp_path / "forged"), "--engine", str(files["fp32"]), "--recheck", "12")
    assert res.exit_code == 1 and f"examples[{j}]: certified again" in res.stderr and "with new noise" in res.stderr
    # a forger who claims a class the engine does not give (the label where the engine is wrong or abstains, another
    # class where it is right) cannot hide behind the new noise: the replay's count of the claimed class is compared,
    # whatever class the replay itself selects
    ex = doc["examples"]
    k = min(range(len(ex["count"])), key=lambda i: ex["count"][i] if ex["prediction"][i] >= 0 else -1)
    claim = ex["label"][k] if ex["prediction"][k] != ex["label"][k] else (ex["label"][k] + 1) % 10
    forged = _forge_count(out, tmp_path / "forged2", k, int(0.86 * n), prediction=claim)
    assert forged["examples"]["prediction"][k] == claim != ex["prediction"][k]
    res = run("-q", "verify", str(tmp_path / "forged2"), "--engine", str(files["fp32"]), "--recheck", "12")
    assert res.exit_code == 1 and f"examples[{k}]: certified again" in res.stderr, res.output
    # the same noise after all: the stream names match again, and so do the counts exactly
    from evaluators.replay import same_noise

    monkeypatch.setattr(kit.smoothing, "noise_stream", lambda device: "cpu")
    assert same_noise(doc, torch.device("cpu"))
    del doc["provenance"]["noise_stream"]  # a certificate from before the record: a CPU's stream is known, a GPU's not
    assert same_noise(doc, torch.device("cpu"))
    doc["provenance"]["device"] = "cuda:0"
    assert not same_noise(doc, torch.device("cpu"))


