"""``NAME@EPS:key=value`` sets an attack's own parameters (checked against its constructor), and ``autoattack`` runs
AutoAttack's four attacks as one name, their worst case reported per threat model."""

from __future__ import annotations

import json

import pytest

from evaluators.evaluate import AttackRequest
from kit.attacks.registry import ATTACKS, PRESETS, expand, get_attack
from kit.errors import UserError
from tests.clitools import assert_user_error, run


def test_parameters_are_typed_and_recorded():
    req = AttackRequest.parse("pgd-linf@0.2:steps=7,restarts=2", None)
    assert req.eps_max == 0.2 and req.spec.kwargs["steps"] == 7 and req.spec.kwargs["restarts"] == 2
    assert req.spec.config()["steps"] == 7
    assert get_attack("pgd-linf").kwargs["steps"] == 10  # the registry itself is unchanged
    attack = req.spec.build(__import__("torch").nn.Linear(1, 1))
    assert attack.steps == 7


@pytest.mark.parametrize("text, needle", [
    ("pgd-linf@0.2:stepz=7", "has no parameter 'stepz'"),
    ("pgd-linf@0.2:steps=7.5", "must be int"),
    ("pgd-linf@0.2:steps", "key=value"),
    ("pgd-linf@0.2:steps=1,steps=2", "given twice"),
    ("pgd-linf@0.2:norm=l2", "has no parameter 'norm'"),
])
def test_bad_parameters_are_refused(text, needle):
    with pytest.raises(UserError, match=needle):
        AttackRequest.parse(text, None)


def test_presets_expand_to_their_attacks():
    reqs = AttackRequest.parse_all(["autoattack@0.1", "autoattack-l2@1.5"], None)
    assert [r.spec.name for r in reqs] == [*expand("autoattack"), *expand("autoattack-l2")]
    assert {r.eps_max for r in reqs[:4]} == {0.1} and {r.eps_max for r in reqs[4:]} == {1.5}
    # a member's own parameters (Square's budget) reach the attack and its recorded config
    squares = [r for r in reqs if r.spec.name.startswith("square")]
    assert [r.spec.config()["queries"] for r in squares] == [1000, 1000]
    assert get_attack("square-linf").kwargs["queries"] == 300  # the registered attack is unchanged
    assert all(m.partition(":")[0] in ATTACKS for members in PRESETS.values() for m in members)
    with pytest.raises(UserError, match="preset"):
        AttackRequest.parse_all(["autoattack@0.1:steps=3"], None)
    with pytest.raises(UserError, match="preset"):
        get_attack("autoattack")


def test_cli_records_the_resolved_parameters_and_refuses_unknown_ones(digits_model, tmp_path):
    res = run("-q", "evaluate", "--twin", digits_model[0], "--attack", "pgd-linf@0.3:steps=3", "--samples", 8,
              "--no-checks", "--out", tmp_path / "e", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["attacks"][0]["config"]["steps"] == 3
    assert_user_error(run("evaluate", "--twin", digits_model[0], "--attack", "pgd-linf@0.3:kernel=3", "--out",
                          tmp_path / "f"), "has no parameter 'kernel'", "steps")
    assert not (tmp_path / "f").exists()
