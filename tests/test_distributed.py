"""``torchrun``: one audit or certificate over several processes (gloo on CPU) equals the one-process run.

Every run here is a real ``torchrun --standalone`` launch of ``python -m kit`` against the one-process command, each
process computing with one thread (``OMP_NUM_THREADS=1``, what torchrun gives its workers: a CPU's reductions depend on
the thread count, so the one-process reference uses one thread too). Reports are compared field by field, the
provenance (times, command, process count) aside.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from kit.distributed import World

ROOT = Path(__file__).resolve().parents[1]
AUDIT = ["--attack", "pgd-linf@0.3", "--samples", "30", "--batch-size", "8", "--rungs", "3",
         "--blackbox-samples", "12", "--allow-flag", "test-blind", "--seed", "3"]
# --noise-samples is --n: torchrun's own parser takes "--n" for an abbreviation of its options
CERTIFY = ["--sigma", "0.25", "--n0", "16", "--noise-samples", "200", "--noise-batch", "100", "--samples", "10",
           "--batch-size", "3", "--attack-n", "50", "--seed", "3"]

pytestmark = pytest.mark.skipif(not shutil.which("torchrun") and not (Path(sys.executable).parent / "torchrun").exists(),
                                reason="torchrun is not installed")


@pytest.fixture(scope="module")
def files(digits_model, digits_exports):
    """The digits twin and its int8 ONNX export (the engine-only search runs too)."""
    return {"twin": str(digits_model[0]), "engine": str(digits_exports["int8"])}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _kit(nproc: int | None, args: list[str], **env: str) -> list[str]:
    """``python -m kit ARGS``, or the same under ``torchrun --standalone --nproc-per-node NPROC``."""
    if nproc is None:
        return [sys.executable, "-m", "kit", "-q", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "kit",
            "-q", *args]


def run(nproc: int | None, args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(_kit(nproc, args), env=_env(**env), capture_output=True, text=True, timeout=600, cwd=ROOT)


def _report(out: Path, name: str) -> dict:
    doc = json.loads((out / name).read_text())
    doc.pop("provenance")
    spot = doc.get("clean", {}).get("spot_check")
    if spot:  # drawn afresh by every audit; on digits it is the whole test split, so only its seed differs
        spot.pop("seed")
    return doc


def same_audit(a: Path, b: Path) -> None:
    ra, rb = _report(a, "report.json"), _report(b, "report.json")
    for key in ra:
        assert ra[key] == rb[key], key
    assert ra == rb
    with np.load(a / "adversarials.npz") as za, np.load(b / "adversarials.npz") as zb:
        assert sorted(za.files) == sorted(zb.files)
        for k in za.files:
            assert np.array_equal(za[k], zb[k]), k


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """The one-process audit (one thread)."""
    out = tmp_path_factory.mktemp("ref") / "audit"
    res = run(None, ["audit", "--engine", files["engine"], "--twin", files["twin"], *AUDIT, "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.parametrize("nproc", [1, 2, 5])
def test_audit_over_processes_equals_one_process(files, reference, tmp_path, nproc):
    """30 examples in batches of 8 (8, 8, 8, 6): two processes take two batches each, five leave one idle, one is
    the plain run under torchrun; every report (every eps*, curve, flag and verdict) and every adversarial is the
    one-process run's."""
    out = tmp_path / "audit"
    res = run(nproc, ["audit", "--engine", files["engine"], "--twin", files["twin"], *AUDIT, "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    same_audit(reference, out)
    prov = json.loads((out / "report.json").read_text())["provenance"]
    assert prov["processes"] == nproc and len(prov["hosts"]) == nproc
    assert not (out / ".audit-state").exists()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out += [int(k) for k in kids]
    return out


def _rank_pid(root: int, tag: str, rank: int) -> int | None:
    """The pid of the worker of rank ``rank`` under the launcher ``root`` (found by its environment)."""
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            todo += _children(pid)
        except OSError:
            continue
        if f"OTKIT_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker through /proc")
def test_a_killed_rank_resumes_without_redoing_finished_batches(files, reference, tmp_path):
    """Rank 1 is killed once it finished a batch: the job fails and writes no report; ``--resume`` with the same
    command finishes it, identical to the one-process run; a finished batch is reused, not recomputed (a copy of the
    folder whose saved batch was altered carries the alteration into its report)."""
    out = tmp_path / "audit"
    args = ["audit", "--engine", files["engine"], "--twin", files["twin"], *AUDIT, "--out", str(out)]
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(_kit(2, args), env=_env(OTKIT_TEST_TAG=tag), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    done = out / ".audit-state" / "pgd-linf.000001.npz"  # batch 1 is rank 1's
    deadline = time.monotonic() + 300
    while not done.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = _rank_pid(proc.pid, tag, 1)
    assert victim is not None and done.exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else ""
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert not (out / "report.json").exists()  # never a report that looks whole
    saved = sorted(p.name for p in (out / ".audit-state").glob("*.npz"))
    assert "pgd-linf.000001.npz" in saved

    poisoned = tmp_path / "poisoned"
    shutil.copytree(out, poisoned)
    with np.load(poisoned / ".audit-state" / "pgd-linf.000001.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["eps_twin"] = np.full_like(arrays["eps_twin"], 0.123)  # batch 1: examples 8..15
    np.savez(poisoned / ".audit-state" / "pgd-linf.000001.npz", **arrays)

    res = run(2, [*args, "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    same_audit(reference, out)
    res = run(2, [*args[:-1], str(poisoned), "--resume"])
    assert res.returncode in (0, 1), res.stderr[-3000:]  # the altered batch may fail the verdict
    eps = json.loads((poisoned / "report.json").read_text())["attacks"][0]["twin"]["eps_star"]
    assert eps[8:16] == [0.123] * 8 and eps[:8] != [0.123] * 8


def test_certify_over_processes_equals_one_process(files, tmp_path):
    """The certificate's counts (per-example noise from (seed, index)) and the attack on the smoothed engine are
    the one-process run's with two processes (10 examples in batches of 3: 4 batches, 2 each)."""
    args = ["certify", "--engine", files["engine"], "--twin", files["twin"], *CERTIFY]
    one, two = tmp_path / "one", tmp_path / "two"
    for nproc, out in ((None, one), (2, two)):
        res = run(nproc, [*args, "--out", str(out)])
        assert res.returncode in (0, 1), res.stderr[-3000:]
    a, b = _report(one, "certificate.json"), _report(two, "certificate.json")
    assert a == b
    assert a["attack"] is not None and len(a["examples"]["count"]) == 10


def test_one_process_world_shares_nothing():
    w = World()
    assert w.lead and not w.distributed and w.owns(0) and w.owns(7)
    arrays = {"eps": np.arange(3.0), "n": np.array(4)}
    assert w.share(0, arrays, ["eps", "n"]) == arrays
    assert w.gather_text("host cpu") == ["host cpu"] and w.total(5) == 5 and w.lead_says(True)
    with pytest.raises(ValueError):
        w.share(0, None, ["eps"])


@pytest.mark.parametrize("env,message", [({"WORLD_SIZE": "2", "RANK": "7"}, "RANK=7"),
                                         ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR")])
def test_a_bad_torchrun_environment_is_one_line(tmp_path, env, message):
    """A rank outside the world, or a world without torchrun's rendezvous variables: one line, exit 2."""
    res = subprocess.run([sys.executable, "-m", "kit", "audit", "--engine", "x.onnx", "--twin", "y", "--attack",
                          "pgd-linf@0.1", "--out", str(tmp_path / "o")],
                         env=_env(**env), capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("Error: "), res.stderr
    assert message in res.stderr


RUN = """
name = "tiny"
[train]
defense = "standard"
data = "digits:16"
epochs = 1
eval_samples = 100
[export]
formats = ["onnx-int8"]
samples = 64
calibration_samples = 64
[audit]
attacks = ["pgd-linf@0.3"]
samples = 20
batch_size = 8
rungs = 3
blackbox_samples = 8
[certify]
formats = ["onnx-int8"]
n = 100
samples = 5
batch_size = 2
attack_n = 50
"""


def test_run_over_processes_equals_one_process(tmp_path):
    """``otkit run`` under torchrun: the lead trains and exports, both processes audit and certify; the reports and
    the summary's figures are the one-process run's."""
    (tmp_path / "run.toml").write_text(RUN)
    outs = {}
    for nproc in (None, 2):
        out = tmp_path / f"runs-{nproc}"
        res = run(nproc, ["run", str(tmp_path / "run.toml"), "--out", str(out), "--json"])
        assert res.returncode in (0, 1), res.stderr[-3000:]
        outs[nproc] = out / "tiny"
    one, two = outs[None], outs[2]

    def figures(path: Path) -> dict:  # the files' paths and hashes name the run folder (their metadata records it)
        doc = _report(path.parent, path.name)
        twin, engine = doc.pop("twin"), doc.pop("engine")
        return {**doc, "weights": twin["weights_sha256"], "precision": engine["precision"]}

    for part in ("audit/onnx-int8/report.json", "certify/onnx-int8/certificate.json"):
        a, b = figures(one / part), figures(two / part)
        for key in a:
            assert a[key] == b[key], (part, key)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    for s in (a, b):
        s.pop("seconds"), s.pop("run"), s.pop("checkpoint")
        for row in s["artifacts"]:
            for k in ("report", "artifact", "certificate"):
                row.pop(k, None)
    assert a == b


def test_a_tensorrt_engine_is_refused_on_mixed_gpus():
    from evaluators.audit import check_cluster
    from kit.errors import UserError

    check_cluster("tensorrt", ["NVIDIA H100 80GB HBM3"] * 4)  # one kind: fine
    check_cluster("onnx", ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"])  # ONNX runs anywhere
    with pytest.raises(UserError, match="A100-SXM4-40GB, NVIDIA H100 80GB HBM3"):
        check_cluster("tensorrt", ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"])
