"""The training loop: learning-rate schedules, resume equals an uninterrupted run, metrics log, bad options."""

from __future__ import annotations

import json
import math

import pytest

from kit.checkpoint import read_checkpoint
from kit.defenses import create_defense, list_defenses
from kit.defenses.trainer import TrainConfig, sidecar, train
from kit.errors import UserError


def test_schedules_match_closed_forms():
    cos = TrainConfig(lr=0.1, epochs=10, schedule="cosine")
    for e in range(10):
        assert cos.lr_at(e) == pytest.approx(0.05 * (1 + math.cos(math.pi * e / 10)))
    ms = TrainConfig(lr=0.1, epochs=100, schedule="multistep", milestones=(0.5, 0.75), gamma=0.1)
    assert [ms.lr_at(e) for e in (0, 49, 50, 74, 75, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert TrainConfig(lr=0.3, schedule="constant").lr_at(7) == 0.3


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    base = dict(arch="cnn-small", data="digits", batch_size=128, seed=3, eval_samples=100)
    straight = train(TrainConfig(epochs=3, **base), tmp_path / "straight.safetensors")
    part = tmp_path / "part.safetensors"

    def interrupt(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt  # as a user's Ctrl-C after the second epoch's checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(epochs=3, **base), part, on_epoch=interrupt)
    assert read_checkpoint(part)[1].train_config["epochs_done"] == 2
    resumed = train(TrainConfig(epochs=3, **base), part, resume=True)
    assert resumed.info.weights_sha256 == straight.info.weights_sha256
    lines = sidecar(part, "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert read_checkpoint(part)[1].train_config["epochs_done"] == 3
    cfg = json.loads(sidecar(part, "config.json").read_text())
    assert cfg["epochs"] == 3 and cfg["seed"] == 3


def test_resume_refuses_changed_options_and_missing_state(tmp_path):
    out = tmp_path / "m.safetensors"
    train(TrainConfig(arch="cnn-small", data="digits", epochs=1, eval_samples=50), out)
    with pytest.raises(UserError, match="options changed.*lr"):
        train(TrainConfig(arch="cnn-small", data="digits", epochs=2, lr=0.01, eval_samples=50), out, resume=True)
    with pytest.raises(UserError, match="nothing to resume"):
        train(TrainConfig(epochs=1), tmp_path / "other.safetensors", resume=True)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "learning rate"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"defense": "nope"}, "unknown defense"),
        ({"arch": "nope"}, "unknown model"),
        ({"data": "nope:x"}, "nope"),
    ],
)
def test_bad_options_are_user_errors(tmp_path, change, match):
    with pytest.raises(UserError, match=match):
        train(TrainConfig(**{"epochs": 1, "data": "digits", **change}), tmp_path / "m.safetensors")


def test_defense_registry():
    assert "standard" in list_defenses()
    with pytest.raises(UserError, match="no parameter"):
        create_defense("standard", beta=1.0)
