"""Release integration (docs/release.md): Hugging Face model-index and model-card, GitHub Actions annotations and step
summaries, JUnit XML.

The model-index is read back with PyYAML and checked against Hugging Face's documented field list (written out here,
from the model card specification, not taken from the kit) and, where `huggingface_hub` is installed, parsed by its own
reader. Workflow-command escaping is checked against hand-written strings, the JUnit file with ElementTree's parser.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from evaluators.ci import STEP_SUMMARY_LIMIT, annotation, append_step_summary, escape_data, escape_property
from tests.clitools import assert_user_error, run

pytestmark = pytest.mark.slow  # trains the session's digits model (shared with other files)

# Hugging Face's model card specification (hub-docs modelcard.md, "Evaluation Results"): the keys of a model-index
# entry, and those it requires
HF_KEYS = {
    "model": {"name", "results"},
    "result": {"task", "dataset", "metrics", "source"},
    "task": {"type", "name"},
    "dataset": {"type", "name", "config", "split", "revision", "args"},
    "metric": {"type", "value", "name", "config", "args", "verified", "verifyToken"},
    "source": {"name", "url"},
}
HF_REQUIRED = {"task": {"type"}, "dataset": {"type", "name"}, "metric": {"type", "value"}}


@pytest.fixture(scope="module")
def released(digits_model, tmp_path_factory):
    """An audit whose gate fails and whose test-blind flag is waived, and a certificate, of one fp32 ONNX engine."""
    from exporters.checkpoint import export_checkpoint

    twin, _ = digits_model
    root = tmp_path_factory.mktemp("release")
    engine = export_checkpoint(twin, "onnx", root / "model.onnx").path
    res = run("-q", "audit", "--engine", engine, "--twin", twin, "--attack", "pgd-linf@0.3", "--attack",
              "pgd-l2@2", "--samples", "40", "--batch-size", "40", "--rungs", "2", "--blackbox-samples", "0",
              "--allow-flag", "test-blind", "--min-auac", "linf=0.99", "--ci", "none", "--out", root / "audit")
    assert res.exit_code == 1, res.output  # the gate
    res = run("-q", "certify", "--engine", engine, "--data", "digits:16", "--sigma", "0.25", "--n0", "32", "--n", "200",
              "--samples", "4", "--batch-size", "4", "--min-certified-auac", "0.01", "--ci", "none",
              "--out", root / "cert")
    assert res.exit_code in (0, 1), res.output
    return root, engine, twin


def _index(res) -> list:
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert text.startswith("---\n") and text.endswith("---\n")
    return yaml.safe_load(text.strip().strip("-"))["model-index"]


def test_model_index_has_the_documented_fields_and_the_reports_figures(released):
    root, _, _ = released
    report = json.loads((root / "audit" / "report.json").read_text())
    cert = json.loads((root / "cert" / "certificate.json").read_text())
    index = _index(run("report", root / "audit", "--format", "model-index", "--certificate", root / "cert",
                       "--source-url", "https://example.org/releases/v1"))
    assert len(index) == 1 and set(index[0]) <= HF_KEYS["model"] and index[0]["name"] == "model"
    (result,) = index[0]["results"]  # one dataset and split: one result
    assert set(result) <= HF_KEYS["result"]
    for part in ("task", "dataset", "source"):
        assert set(result[part]) <= HF_KEYS[part] and HF_REQUIRED.get(part, set()) <= set(result[part])
    for m in result["metrics"]:
        assert set(m) <= HF_KEYS["metric"] and HF_REQUIRED["metric"] <= set(m)
        assert isinstance(m["value"], float) and m["verified"] is False
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"type": "digits", "name": "digits:16", "split": "test",
                                 "args": {"fingerprint": report["data"]["fingerprint"], "examples": 40, "seed": 0}}
    assert result["source"]["url"] == "https://example.org/releases/v1"
    by_type = {}
    for m in result["metrics"]:
        by_type.setdefault(m["type"], []).append(m)
    assert by_type["accuracy"][0]["value"] == round(report["clean"]["engine_accuracy"], 4)
    worst = {w["norm"]: w for w in report["worst_case"]}
    assert {m["args"]["threat_model"] for m in by_type["robust-auac"]} == set(worst) == {"linf", "l2"}
    for m in by_type["robust-auac"]:
        w = worst[m["args"]["threat_model"]]
        assert m["value"] == round(w["engine"]["auac"], 4) and m["args"]["bound"] == "upper"
        assert "upper bound" in m["name"] and m["args"]["eps_max"] == w["eps_max"]
    (c,) = by_type["certified-auac"]
    assert c["value"] == round(cert["certified"]["auac"], 4) and c["args"]["bound"] == "lower"
    assert "lower bound" in c["name"] and c["args"]["alpha"] == cert["smoothing"]["alpha"]


def test_model_index_round_trips_through_huggingface_hub(released):
    hub = pytest.importorskip("huggingface_hub")
    root, _, _ = released
    res = run("report", root / "audit", "--format", "model-index", "--certificate", root / "cert",
              "--name", "my: model # 1, \"quoted\"")
    index = _index(res)
    card = hub.ModelCard(res.stdout + "\n# card\n")
    results = card.data.eval_results
    assert card.data.model_name == "my: model # 1, \"quoted\"" == index[0]["name"]
    flat = [m for r in index[0]["results"] for m in r["metrics"]]
    assert [(e.metric_type, e.metric_value, e.metric_name, e.dataset_split) for e in results] == \
        [(m["type"], m["value"], m["name"], "test") for m in flat]


def test_model_card_section(released):
    root, _, _ = released
    report = json.loads((root / "audit" / "report.json").read_text())
    res = run("report", root / "audit", "--format", "model-card", "--certificate", root / "cert")
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert text.startswith("## Robustness")
    plots = [(root / "audit" / "curves.png").resolve(), (root / "cert" / "certified.png").resolve()]
    # on stdout the plots are linked from the current folder to where they lie
    assert _image_links(text, Path.cwd()) == plots
    for w in report["worst_case"]:
        assert f"{w['engine']['auac']:.4f}" in text
    assert "upper bound (attacks)" in text and "lower bound (certified)" in text
    # written to a file: linked from the card's folder, so the card renders where it is (the README tour's case)
    card = root / "robustness.md"
    res = run("report", root / "audit", "--format", "model-card", "--certificate", root / "cert", "--out", card)
    assert res.exit_code == 0, res.output
    text = card.read_text()
    assert "(audit/curves.png)" in text and "(cert/certified.png)" in text
    assert _image_links(text, root) == plots
    # a certificate alone
    res = run("report", root / "cert", "--format", "model-card")
    assert res.exit_code == 0 and "curves.png" not in res.stdout
    assert _image_links(res.stdout, Path.cwd()) == plots[1:]


def _image_links(text: str, base: Path) -> list[Path]:
    """The files a Markdown text's images point at, resolved from ``base``; each must exist."""
    import re
    from urllib.parse import unquote

    links = re.finditer(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    paths = [(base / unquote(m.group(1))).resolve() for m in links]
    assert all(p.is_file() for p in paths), paths
    return paths


@pytest.mark.parametrize("args,needle", [
    (["--format", "model-index", "--source-url", "javascript:alert(1)"], "--source-url"),
    (["--format", "model-index", "--source-url", "https://a b"], "--source-url"),
    (["--format", "md", "--name", "x"], "go with --format model-index"),
])
def test_release_options_refuse_bad_values(released, args, needle):
    root, _, _ = released
    assert_user_error(run("report", root / "audit", *args), needle)


def test_a_local_data_path_stays_out_of_the_model_index(released, tmp_path):
    root, _, _ = released
    doc = json.loads((root / "audit" / "report.json").read_text())
    doc["data"]["spec"] = "mnist:/home/someone/data/mnist"
    (tmp_path / "report.json").write_text(json.dumps(doc))
    from evaluators.release import model_index

    (result,) = model_index(doc)[0]["results"]
    assert result["dataset"]["name"] == "mnist" and "someone" not in json.dumps(result)


def test_workflow_command_escaping():
    assert escape_data("50% done\r\nnext") == "50%25 done%0D%0Anext"
    assert escape_property("a:b,c%\n") == "a%3Ab%2Cc%25%0A"
    assert annotation("error", "otkit audit: gate linf, 1", "AUAC 0.2 < 0.99\nsee report.md") == \
        "::error title=otkit audit%3A gate linf%2C 1::AUAC 0.2 < 0.99%0Asee report.md"


def test_ci_github_annotations_and_step_summary(released, tmp_path, monkeypatch):
    root, engine, twin = released
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step text\n")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")  # --ci auto picks github
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    res = run("-q", "audit", "--engine", engine, "--twin", twin, "--attack", "pgd-linf@0.3", "--samples", "40",
              "--batch-size", "40", "--rungs", "2", "--blackbox-samples", "0", "--allow-flag", "test-blind",
              "--min-auac", "linf=0.99", "--junit", tmp_path / "junit.xml", "--out", tmp_path / "audit")
    assert res.exit_code == 1
    lines = [s for s in res.stdout.splitlines() if s.startswith("::")]
    errors = [s for s in lines if s.startswith("::error ")]
    warnings = [s for s in lines if s.startswith("::warning ")]
    assert len(errors) == 1 and errors[0].startswith("::error title=otkit audit of model.onnx%3A gate linf >= 0.99::")
    assert any("test-blind" in w and "allowed by --allow-flag" in w for w in warnings)
    assert all("\n" not in s and "\r" not in s for s in lines)
    text = summary.read_text()
    assert text.startswith("earlier step text\n") and (tmp_path / "audit" / "report.md").read_text() in text
    # --json: the JSON alone on stdout, the annotations on stderr
    res = run("-q", "audit", "--engine", engine, "--twin", twin, "--attack", "pgd-linf@0.3", "--samples", "40",
              "--batch-size", "40", "--rungs", "2", "--blackbox-samples", "0", "--allow-flag", "test-blind",
              "--json", "--out", tmp_path / "audit2")
    json.loads(res.stdout)
    assert "::warning title=" in res.stderr


def test_junit_cases_match_the_report(released, tmp_path):
    root, _, _ = released
    from evaluators.ci import junit_xml

    report = json.loads((root / "audit" / "report.json").read_text())
    cert = json.loads((root / "cert" / "certificate.json").read_text())
    report["checks"].append({"id": "odd", "severity": "error", "attack": None, "message": "bad \x00\x1b byte"})
    xml = junit_xml([("audit", report), ("certificate", cert)])
    tree = ET.fromstring(xml)  # well-formed, control characters dropped
    suites = tree.findall("testsuite")
    assert [s.get("name") for s in suites] == ["audit", "certificate"]
    audit = suites[0]
    names = [c.get("name") for c in audit.findall("testcase")]
    assert names[:1] == ["clean agreement"]
    assert {f"fidelity {a['name']}" for a in report["attacks"]} <= set(names)
    assert {f"worst case {w['norm']}" for w in report["worst_case"]} <= set(names)
    failed = {c.get("name"): c.find("failure").get("message") for c in audit.findall("testcase")
              if c.find("failure") is not None}
    assert set(failed) == {"gate linf >= 0.99", "flag odd (model)"} and failed["flag odd (model)"] == "bad  byte"
    assert int(audit.get("failures")) == 2 and int(audit.get("tests")) == len(names)
    skipped = [c.get("name") for c in audit.findall("testcase") if c.find("skipped") is not None]
    assert skipped == ["flag test-blind (model)"] and int(audit.get("skipped")) == 1
    gate = [c for c in suites[1].findall("testcase") if c.get("name").startswith("gate certified AUAC")]
    assert len(gate) == 1 and (gate[0].find("failure") is None) == cert["gates"][0]["passed"]
    assert int(tree.get("tests")) == sum(int(s.get("tests")) for s in suites)


def test_step_summary_stays_under_the_cap_for_an_audit_with_many_attacks(released, tmp_path):
    root, _, _ = released
    from evaluators.render import render_markdown

    doc = json.loads((root / "audit" / "report.json").read_text())
    base = doc["attacks"][0]
    doc["attacks"] = [{**base, "name": f"pgd-linf-{i}"} for i in range(6000)]
    markdown = render_markdown(doc)
    assert len(markdown.encode()) > STEP_SUMMARY_LIMIT
    path = tmp_path / "summary.md"
    path.write_text("x" * 1000 + "\n")
    assert append_step_summary(path, markdown, "runs/x/audit")
    data = path.read_bytes()
    assert len(data) <= STEP_SUMMARY_LIMIT and b"1 MiB" in data[-300:] and b"runs/x/audit" in data[-300:]
    body = data[1001:data.rindex(b"\n\n> **Cut here:**")]
    assert markdown.encode().startswith(body) and body.endswith(b"\n")  # cut at a line boundary
    # a full summary file takes nothing more, not even half a line
    before = path.read_bytes()
    append_step_summary(path, markdown, "runs/x/audit")
    assert len(path.read_bytes()) <= STEP_SUMMARY_LIMIT and path.read_bytes().startswith(before)


def test_junit_into_a_missing_folder_is_refused_before_any_work(released, tmp_path):
    _, engine, twin = released
    res = run("audit", "--engine", engine, "--twin", twin, "--attack", "pgd-linf@0.3",
              "--junit", tmp_path / "nope" / "j.xml", "--out", tmp_path / "a")
    assert_user_error(res, "--junit", "no such folder")
    assert not (tmp_path / "a").exists()


def test_run_publishes_every_report(tmp_path, monkeypatch):
    from tests.test_pipeline import TINY

    summary = tmp_path / "s.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    toml = TINY.replace('formats = ["onnx", "onnx-int8", "tensorrt"]', 'formats = ["onnx", "onnx-int8"]')
    (tmp_path / "run.toml").write_text(toml)
    res = run("-q", "run", tmp_path / "run.toml", "--out", tmp_path / "runs", "--ci", "github", "--junit",
              tmp_path / "j.xml")
    assert res.exit_code in (0, 1), res.output
    tree = ET.parse(tmp_path / "j.xml").getroot()
    assert [s.get("name") for s in tree.findall("testsuite")] == \
        ["audit of onnx", "audit of onnx-int8", "certificate of onnx-int8"]
    text = summary.read_text()
    assert text.count("# ") >= 3 and "Certificate of model-int8.onnx" in text


def test_the_github_workflow_example_runs(digits_model, tmp_path):
    """examples/github/audit.yml's steps, run by bash as a runner would run them: its `${{ }}` expressions and the
    job env replaced (a small audit instead of AutoAttack on 1000 examples), `uses:` steps and the release upload
    left out. The export, the signed audit (with its annotations and step summary), the verification and the
    model-index must all succeed."""
    import os
    import re
    import shutil
    import subprocess
    import sys

    workflow = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "github" / "audit.yml").read_text())
    job = workflow["jobs"]["audit"]
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copy(digits_model[0], work / "model.safetensors")
    keys = run("keygen", "--out", tmp_path / "release")
    assert keys.exit_code == 0
    shutil.copy(tmp_path / "release.pub", work / "release.pub")
    runner_temp = tmp_path / "runner"
    runner_temp.mkdir()
    values = {"secrets.OTKIT_SIGNING_KEY": (tmp_path / "release.key").read_text(), "secrets.OTKIT_SIGN_PASSWORD": "",
              "runner.temp": str(runner_temp), "github.token": "", "github.event_name": "push"}
    env = {**os.environ, **{k: str(v) for k, v in job["env"].items()},
           "ATTACKS": "--attack pgd-linf@0.3 --rungs 2 --blackbox-samples 0 --allow-flag test-blind",
           "SAMPLES": "40", "GATES": "--min-auac linf=0.01", "GITHUB_ACTIONS": "true",
           "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"), "RUNNER_TEMP": str(runner_temp),
           "GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "me/model",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    ran = []
    for step in job["steps"]:
        if "run" not in step or step.get("if") or step["name"] == "Install otkit":
            continue
        script = re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", lambda m: values[m.group(1)], step["run"])
        step_env = {**env, **{k: re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", lambda m: values[m.group(1)], str(v))
                              for k, v in step.get("env", {}).items()}}
        r = subprocess.run(["bash", "-e", "-c", script], cwd=work, env=step_env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, (step["name"], r.stdout, r.stderr)
        ran.append((step["name"], r))
    assert [n for n, _ in ran] == ["Export", "Signing key", "Audit", "Verify", "Model card metadata"]
    assert (work / "audit" / "report.sigstore.json").is_file() and (work / "audit-junit.xml").is_file()
    assert "# " in (tmp_path / "summary.md").read_text()
    assert "::warning title=" in dict(ran)["Audit"].stdout
    index = yaml.safe_load((work / "audit" / "model-index.md").read_text().strip().strip("-"))["model-index"]
    assert index[0]["results"][0]["source"]["url"] == "https://github.com/me/model/releases"


def test_model_card_links_each_certificates_own_plot_and_leaves_out_missing_ones(released, tmp_path):
    """Two certificates: two plots, each linked to its own folder (both files are named certified.png), a path with a
    space percent-encoded; a certificate whose plot is missing gets no image, not a broken link."""
    import shutil

    from evaluators.certificate import load_certificate
    from evaluators.release import model_card

    root, _, _ = released
    second, bare = tmp_path / "my cert", tmp_path / "bare"
    shutil.copytree(root / "cert", second)
    shutil.copytree(root / "cert", bare)
    (bare / "certified.png").unlink()
    card = tmp_path / "card.md"
    res = run("report", root / "audit", "--format", "model-card", "--certificate", root / "cert", "--certificate",
              second, "--certificate", bare, "--out", card)
    assert res.exit_code == 0, res.output
    text = card.read_text()
    assert "(my%20cert/certified.png)" in text
    assert _image_links(text, tmp_path) == [(root / "audit" / "curves.png").resolve(),
                                            (root / "cert" / "certified.png").resolve(),
                                            (second / "certified.png").resolve()]
    assert text.count("![certified accuracy") == 2
    cert = load_certificate(root / "cert")
    with pytest.raises(ValueError, match="2 certificates but 1 plot links"):
        model_card(None, [cert, cert], certified=["certified.png"])
