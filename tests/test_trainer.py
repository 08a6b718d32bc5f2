"""The training loop: learning-rate schedules, resume equals an uninterrupted run, metrics log, bad options;
crop/flip augmentation, mixed precision, held-out adversarial accuracy, ``--config`` files, and every registered
defense trained, resumed and reloaded from the command line."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import models as zoo
from kit.attacks.pgd import PGD
from kit.attacks.wasserstein import WassersteinPGD
from kit.checkpoint import load_twin, read_checkpoint
from kit.cli import cli
from kit.data import load_dataset
from kit.defenses import create_defense, list_defenses
from kit.defenses import trainer as trainer_mod
from kit.defenses.trainer import (
    Augment,
    TrainConfig,
    apply_crop_flip,
    crop_flip,
    crop_padding,
    draw_crop_flip,
    eval_adversary,
    load_train_config,
    resolve_augment,
    sidecar,
    train,
)
from kit.errors import UserError
from tests.test_data import make_cifar10

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_resume_takes_a_parameter_added_since_at_its_default_only(tmp_path):
    """A run saved before a defense gained a parameter resumes at that parameter's default (the old behaviour),
    bit for bit as if it had never stopped; asked for another value, it is refused."""
    base = dict(arch="cnn-small", data="digits", batch_size=128, seed=3, eval_samples=50, defense="madry",
                defense_params={"eps": 0.1, "steps": 2})
    straight = train(TrainConfig(epochs=2, **base), tmp_path / "straight.safetensors")
    part = tmp_path / "part.safetensors"
    train(TrainConfig(epochs=1, **base), part)
    state_path = sidecar(part, "resume.pt")
    state = torch.load(state_path, weights_only=True)
    saved = json.loads(state["config"])
    assert saved["defense_params"].pop("attack_all") is False  # as saved before the parameter existed
    state["config"] = json.dumps(saved)
    torch.save(state, state_path)
    new_value = {**base, "defense_params": {**base["defense_params"], "attack_all": True}}
    with pytest.raises(UserError, match="options changed.*defense_params"):
        train(TrainConfig(epochs=2, **new_value), part, resume=True)
    resumed = train(TrainConfig(epochs=2, **base), part, resume=True)
    assert resumed.info.weights_sha256 == straight.info.weights_sha256


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


# ---------------------------------------------------------------------------------------------------- augmentation
def test_crop_flip_matches_hand_computed_pixels():
    img = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]]) / 10
    x = torch.stack([img, 2 * img, 3 * img])[None].repeat(3, 1, 1, 1)  # (3, 3, 3, 3), channel c = (c+1) * img
    dy, dx, flip = torch.tensor([0, 2, 1]), torch.tensor([0, 1, 1]), torch.tensor([False, True, False])
    out = apply_crop_flip(x, dy, dx, flip, pad=1)
    # padded (5 x 5, zero border); window at (0, 0): top-left corner of the image pushed down-right
    expect0 = torch.tensor([[0.0, 0, 0], [0, 1, 2], [0, 4, 5]]) / 10
    # window at (2, 1), rows 2..4, cols 1..3 = [[4,5,6],[7,8,9],[0,0,0]], mirrored left-right
    expect1 = torch.tensor([[6.0, 5, 4], [9, 8, 7], [0, 0, 0]]) / 10
    for c in range(3):
        assert torch.equal(out[0, c], (c + 1) * expect0)
        assert torch.equal(out[1, c], (c + 1) * expect1)
    assert torch.equal(out[2], x[2])  # window at (pad, pad), no flip: the image itself
    assert crop_padding(32, 32) == 4 and crop_padding(28, 28) == 2 and crop_padding(16, 16) == 2


def test_crop_flip_matches_numpy_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    out = crop_flip(x, torch.Generator().manual_seed(5))
    assert torch.equal(out, crop_flip(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, crop_flip(x, torch.Generator().manual_seed(6)))
    dy, dx, flip = draw_crop_flip(16, 2, torch.Generator().manual_seed(5))
    assert dy.min() >= 0 and dy.max() <= 4 and flip.any() and (~flip).any()
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)))  # numpy reference, image by image
    for i in range(16):
        ref = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        if flip[i]:
            ref = ref[:, :, ::-1]
        np.testing.assert_array_equal(out[i].numpy(), ref)


def test_auto_augment_flips_colour_images_only(monkeypatch, tmp_path, tiny_cifar):
    calls = []
    real = trainer_mod.crop_flip

    def spy(x, gen, pad=None):
        calls.append(tuple(x.shape))
        return real(x, gen, pad)

    monkeypatch.setattr(trainer_mod, "crop_flip", spy)
    assert resolve_augment("auto", (1, 28, 28)) is Augment.NONE
    assert resolve_augment("auto", (3, 32, 32)) is Augment.CROP_FLIP
    assert resolve_augment("none", (3, 32, 32)) is Augment.NONE
    base = dict(data="digits", epochs=1, eval_samples=50, eval_adv_samples=0)
    grey = train(TrainConfig(augment="auto", **base), tmp_path / "grey.safetensors")
    assert calls == [] and grey.info.train_config["augment"] == "none"
    plain = train(TrainConfig(augment="none", **base), tmp_path / "plain.safetensors")
    assert plain.info.weights_sha256 == grey.info.weights_sha256
    train(TrainConfig(augment="crop-flip", **base), tmp_path / "forced.safetensors")  # asked for: applied
    assert calls and all(shape[1] == 1 for shape in calls)
    calls.clear()
    colour = train(TrainConfig(data=tiny_cifar, epochs=1, batch_size=32, eval_samples=14, eval_adv_samples=0),
                   tmp_path / "colour.safetensors")
    assert [s[0] for s in calls] == [32, 32, 1] and colour.info.train_config["augment"] == "crop-flip"


def test_resume_is_exact_with_crop_flip(tmp_path, tiny_cifar):
    base = dict(data=tiny_cifar, batch_size=16, seed=2, eval_samples=14, eval_adv_samples=0)
    straight = train(TrainConfig(epochs=2, **base), tmp_path / "a.safetensors")
    train(TrainConfig(epochs=1, **base), tmp_path / "b.safetensors")
    resumed = train(TrainConfig(epochs=2, **base), tmp_path / "b.safetensors", resume=True)
    assert resumed.info.weights_sha256 == straight.info.weights_sha256
    plain = train(TrainConfig(epochs=2, augment="none", **base), tmp_path / "c.safetensors")
    assert plain.info.weights_sha256 != straight.info.weights_sha256  # the augmentation did change the batches


# ------------------------------------------------------------------------------------------------------------- AMP
def test_amp_on_cpu_warns_and_trains_in_float32(tmp_path, caplog):
    base = dict(data="digits", epochs=1, eval_samples=50, eval_adv_samples=0)
    with caplog.at_level(logging.WARNING, logger="kit.defenses.trainer"):
        amp = train(TrainConfig(amp=True, **base), tmp_path / "amp.safetensors")
    assert any("amp" in r.getMessage() and "float32" in r.getMessage() for r in caplog.records)
    fp32 = train(TrainConfig(amp=False, **base), tmp_path / "fp32.safetensors")
    assert amp.info.weights_sha256 == fp32.info.weights_sha256
    assert json.loads(sidecar(tmp_path / "amp.safetensors", "config.json").read_text())["amp"] is False
    state = torch.load(sidecar(tmp_path / "amp.safetensors", "resume.pt"), weights_only=True)
    assert state["scaler"] == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision needs CUDA")
def test_amp_on_cuda_keeps_the_scaler_across_resume(tmp_path):
    base = dict(data="digits", batch_size=32, eval_samples=50, eval_adv_samples=0, amp=True)
    out = tmp_path / "m.safetensors"
    first = train(TrainConfig(epochs=1, **base), out, device="cuda")
    assert first.info.train_config["amp"] is True
    state = torch.load(sidecar(out, "resume.pt"), weights_only=True)
    assert state["scaler"]["scale"] > 0
    resumed = train(TrainConfig(epochs=2, **base), out, device="cuda", resume=True)
    assert math.isfinite(resumed.final["loss"]) and resumed.final["test_acc"] > 0.3
    model, info = load_twin(out)
    assert info.train_config["epochs_done"] == 2


# ------------------------------------------------------------------------------------- held-out adversarial accuracy
def test_eval_adversary_choice():
    model = zoo.create("cnn-small", num_classes=10, input_shape=(1, 8, 8))
    picks = {}
    for name, arch_model in (("standard", model), ("madry", model), ("trades", model), ("wat", model)):
        d = create_defense(name)
        d.setup(arch_model)
        picks[name] = eval_adversary(d, arch_model, seed=3)
    assert picks["standard"] is None
    madry = picks["madry"]
    assert isinstance(madry, PGD) and madry.eval_mode and madry.early_stop and madry.seed == 3
    trades = picks["trades"]
    assert isinstance(trades, PGD) and trades.eps == pytest.approx(8 / 255) and trades.steps == 10
    assert isinstance(picks["wat"], WassersteinPGD)
    otc_model = zoo.create("otc", num_classes=10, input_shape=(1, 8, 8))
    otc_adv = create_defense("otc-adv")
    otc_adv.setup(otc_model)
    assert isinstance(eval_adversary(otc_adv, otc_model), PGD)  # the adversary of the Madry defense it wraps
    own = create_defense("madry", attack_eval_mode=False)
    own.setup(model)
    assert eval_adversary(own, model).eval_mode and own.adversary.eval_mode is False  # a copy; training's untouched


def test_held_out_adversarial_accuracy_is_recorded(tmp_path):
    out = tmp_path / "m.safetensors"
    params = {"eps": 0.1, "steps": 2}
    res = train(TrainConfig(defense="madry", data="digits", epochs=1, seed=4, eval_samples=100, eval_adv_samples=40,
                            defense_params=params), out)
    rec = res.final
    # recomputed independently on the checkpoint reloaded from disk: the same held-out examples, a fresh PGD
    model = load_twin(out)[0]
    held = load_dataset("digits", "test").subset(100, seed=0)
    x, y = held.x[:40], held.y[:40]
    robust = PGD(model, eps=0.1, steps=2, seed=4)(x, y).robust_accuracy
    assert rec["test_adv_acc"] == pytest.approx(robust) and rec["test_adv_attack"] == "PGD"
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert rec["test_adv_acc"] <= clean
    none = train(TrainConfig(data="digits", epochs=1, eval_samples=50, eval_adv_samples=0,
                             defense="madry", defense_params=params), tmp_path / "n.safetensors")
    assert "test_adv_acc" not in none.final


# ----------------------------------------------------------------------------------------------- --config (TOML)
CONFIG = """\
[run]                   # other sections (a future `otkit run`) are ignored here
name = "demo"

[train]
data = "digits"
defense = "madry"
epochs = 1
lr = 0.01
batch-size = 128
seed = 3
eval_samples = 50
eval_adv_samples = 0
milestones = [0.25, 0.5]

[train.defense_params]
eps = 0.1
steps = 1
"""


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_config_file_and_command_line_precedence(tmp_path, monkeypatch):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    assert load_train_config(path)["batch_size"] == 128
    out = tmp_path / "m.safetensors"
    r = _cli("-q", "train", "--config", str(path), "--lr", "0.02", "--param", "steps=2", "--out", str(out))
    assert r.exit_code == 0, r.output
    cfg = json.loads(sidecar(out, "config.json").read_text())
    assert cfg["lr"] == 0.02  # command line beats the file
    assert (cfg["batch_size"], cfg["epochs"], cfg["seed"], cfg["defense"]) == (128, 1, 3, "madry")  # file
    assert cfg["milestones"] == [0.25, 0.5]
    assert (cfg["momentum"], cfg["schedule"], cfg["eval_adv_samples"]) == (0.9, "cosine", 0)  # defaults / file
    assert cfg["augment"] == "none" and cfg["amp"] is False  # resolved: greyscale digits, no CUDA asked
    # the defense's parameters: file, then --param key by key, then the defense's defaults, all recorded
    assert cfg["defense_params"]["eps"] == 0.1 and cfg["defense_params"]["steps"] == 2
    assert cfg["defense_params"]["norm"] == "linf" and cfg["defense_params"]["attack_eval_mode"] is True
    assert read_checkpoint(out)[1].train_config["lr"] == 0.02

    seen = []
    monkeypatch.setattr(trainer_mod, "train", lambda cfg, *a, **k: seen.append(cfg) or _Done())
    for args, seed in ((["train"], 3), (["--seed", "7", "train"], 7), (["--seed", "7", "train", "--seed", "9"], 9),
                       (["--seed", "0", "train"], 0)):
        r = _cli("-q", *args, "--config", str(path), "--out", str(out))
        assert r.exit_code == 0, r.output
        assert seen[-1].seed == seed, args
    _cli("-q", "train", "--config", str(path), "--batch-size", "64", "--augment", "crop-flip", "--amp", "--out",
         str(out))
    assert (seen[-1].batch_size, seen[-1].augment, seen[-1].amp, seen[-1].lr) == (64, "crop-flip", True, 0.01)
    _cli("-q", "train", "--out", str(out))  # no file: the defaults
    assert seen[-1] == TrainConfig()


class _Done:
    """What the monkeypatched trainer returns: enough for the CLI's summary line."""

    path, history, final = Path("x"), [], {}
    info = type("Info", (), {"weights_sha256": ""})()


@pytest.mark.parametrize(("text", "needle"), [
    (None, "config file not found"),
    ("[train\nlr = 1\n", "malformed TOML"),
    ("[train]\nlearning_rate = 0.1\n", "learning_rate"),
    ('[train]\nlr = "fast"\n', "lr must be a number"),
    ("[train]\nepochs = true\n", "epochs must be an integer"),
    ("[train]\nepochs = 2.5\n", "epochs must be an integer"),
    ("[train]\ndefense_params = 3\n", "defense_params must be a table"),
    ("[train]\nmilestones = [0.5, \"x\"]\n", "milestones must be an array of numbers"),
    ("[run]\nname = 1\n", "no [train] table"),
    ("train = 3\n", "'train' must be a table"),
    ('[train]\ndefense = "nope"\n', "unknown defense"),
    (b"[train]\nlr = 0.1 # \xff\n", "not UTF-8"),
])
def test_bad_config_files_exit_2_with_one_line(tmp_path, text, needle):
    path = tmp_path / "run.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    r = _cli("-q", "train", "--config", str(path), "--epochs", "1", "--out", str(tmp_path / "m.safetensors"))
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.output
    if needle not in ("unknown defense", "config file not found"):
        assert str(path) in lines[0]


def test_config_types_are_checked_in_from_dict():
    with pytest.raises(UserError, match="unknown training option"):
        TrainConfig.from_dict({"nope": 1})
    with pytest.raises(UserError, match="amp must be true or false"):
        TrainConfig.from_dict({"amp": 1})
    assert TrainConfig.from_dict({"lr": 1, "batch-size": 8}) == TrainConfig(lr=1.0, batch_size=8)
    with pytest.raises(UserError, match="augment"):
        train(TrainConfig(augment="sometimes"), "x.safetensors")


# ------------------------------------------------------------------------------- every defense, from the CLI, resumed
#: Parameters that make each defense cheap, applied where a defense has them (defenses added later included).
CHEAP = {"steps": 1, "max_iter": 5, "proj_iter": 3, "sinkhorn_iters": 3, "eps_every": 1, "critic_steps": 1,
         "phi_steps": 1}
#: Defenses that need a particular architecture (the others train cnn-small).
ARCH = {"otc": "otc", "otc-adv": "otc"}


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """A CIFAR-10 'python version' folder: 65 train, 14 test images of 3 x 32 x 32 (tests/test_data.py's writer)."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    make_cifar10(root, per_batch=13)
    return f"cifar10:{root}"


@pytest.mark.parametrize("defense", list_defenses())
def test_every_defense_trains_resumes_and_loads_from_the_cli(defense, tiny_cifar, tmp_path):
    known = create_defense(defense).params
    params = [a for k, v in CHEAP.items() if k in known for a in ("--param", f"{k}={json.dumps(v)}")]
    out = tmp_path / f"{defense}.safetensors"
    common = ["-q", "train", "--defense", defense, "--arch", ARCH.get(defense, "cnn-small"), "--data", tiny_cifar,
              "--batch-size", "32", "--eval-samples", "14", "--eval-adv-samples", "4", *params, "--out", str(out)]
    first = _cli(*common, "--epochs", "1")
    assert first.exit_code == 0, first.output
    assert read_checkpoint(out)[1].train_config["epochs_done"] == 1
    second = _cli(*common, "--epochs", "2", "--resume", "--json")
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["epochs"] == 2
    lines = [json.loads(line) for line in sidecar(out, "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in lines] == [1, 2]
    assert all(math.isfinite(rec["loss"]) for rec in lines)
    model, info = load_twin(out)
    assert info.input_shape == [3, 32, 32] and info.num_classes == 10 and info.defense == defense
    assert info.train_config["epochs_done"] == 2 and info.train_config["augment"] == "crop-flip"
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_train_samples_trains_on_a_stratified_subset(tmp_path):
    """train_samples > 0: the checkpoint records that subset (its size and fingerprint, Dataset.stratified's); 0
    leaves the record as before (no train_samples key: earlier runs' configurations and hashes stay equal)."""
    full = load_dataset("digits", "train")
    want = full.stratified(300, seed=0)
    r = train(TrainConfig(data="digits", epochs=1, eval_samples=20, eval_adv_samples=0, train_samples=300),
              tmp_path / "sub.safetensors")
    ds = r.info.dataset
    assert ds["n_train"] == 300 and ds["fingerprint"] == want.fingerprint
    assert r.info.train_config["train_samples"] == 300
    assert "train_samples" not in TrainConfig().to_dict()
    with pytest.raises(UserError, match="train samples"):
        TrainConfig(train_samples=-1).validate()
