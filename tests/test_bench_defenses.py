"""bench/defenses.py: ``--json FILE`` keeps the rows of earlier invocations of the same settings, read back from the
file they were written to; ``--table`` prints each AutoAttack member beside the worst case; a preset's GOT beta
sweep adds rows that differ from ``got-pgd`` in beta alone; each document names the commit of its code."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.common import source_revision
from bench.defenses import PRESETS, keep_earlier_rows, members_lines, recipes


def _doc(rows: dict, adversary=(10, 0.025)) -> dict:
    return {"settings": {"preset": "fashion-mnist", "train_adversary": adversary, "eps_linf_train": 0.1},
            "recipes": {k: {"defense": k} for k in rows}, "rows": dict(rows)}


def test_rows_of_an_earlier_invocation_with_the_same_settings_are_kept(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(_doc({"standard": {"acc": 0.88}, "madry": {"acc": 0.85}})))
    doc = _doc({})  # this invocation: --only madry, with the settings' tuple as the script builds it
    doc["recipes"] = {"madry": {"defense": "madry", "new": True}}
    keep_earlier_rows(doc, json.loads(path.read_text()), ["madry"])
    assert doc["rows"] == {"standard": {"acc": 0.88}}  # madry is rerun, so its old row goes
    assert doc["recipes"] == {"standard": {"defense": "standard"}, "madry": {"defense": "madry", "new": True}}


def test_rows_of_other_settings_are_dropped():
    old = json.loads(json.dumps(_doc({"standard": {"acc": 0.88}}, adversary=(40, 0.01))))
    doc = _doc({})
    keep_earlier_rows(doc, old, ["madry"])
    assert doc["rows"] == {} and doc["recipes"] == {}


def test_members_table_lists_each_member_beside_the_worst_case():
    doc = {"rows": {
        "sat": {"auac": {"linf": {"auac": 0.711, "members_auac": {"apgd-ce": 0.859, "square-linf": 0.717}}}},
        "gaussian": {"auac": {"linf": {"auac": 0.4}}}}}  # one attack, no members: no line
    lines = members_lines(doc)
    assert lines[1] == "| row | apgd-ce | square-linf | worst case |"
    assert lines[3:] == ["| sat | 0.859 | 0.717 | 0.711 |"]
    assert members_lines({"rows": {"gaussian": doc["rows"]["gaussian"]}}) == []


def test_got_beta_sweep_rows_differ_from_got_pgd_in_beta_only():
    fashion = recipes(PRESETS["fashion-mnist"], Path("/data"))
    base = fashion["got-pgd"]
    for b in PRESETS["fashion-mnist"].got_betas:
        row = fashion[f"got-pgd-beta{b:g}"]
        assert row.params == {**base.params, "beta": b}
        assert (row.defense, row.arch, row.optimizer, row.lr, row.epochs) == \
            (base.defense, base.arch, base.optimizer, base.lr, base.epochs)
    assert base.params["beta"] == 10.0
    assert not any(k.startswith("got-pgd-beta") for k in recipes(PRESETS["mnist"], Path("/data")))


def test_source_revision_names_the_checkouts_commit():
    """A result document names the commit of its code: ``git rev-parse HEAD``, ``-dirty`` added with local changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    except OSError:
        pytest.skip("git is not installed")
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True).stdout.strip()
    assert source_revision() == head.stdout.strip() + ("-dirty" if dirty else "")
