"""Checkpoints: round trip, provenance metadata, tamper detection, and refusal of pickles that would run code."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

import models
from kit.checkpoint import CheckpointInfo, load_twin, read_checkpoint, save_checkpoint, weights_sha256
from kit.data import load_dataset
from kit.errors import UserError


def _info(model) -> CheckpointInfo:
    return CheckpointInfo(
        arch={"kind": "zoo", "config": model.config},
        num_classes=model.num_classes,
        class_names=[str(i) for i in range(model.num_classes)],
        input_shape=list(model.input_shape),
        normalization={"mean": None, "std": None},
        dataset={"spec": "digits", "fingerprint": "sha256:x"},
    )


@pytest.mark.parametrize("name", ["cnn-small", "resnet20", "otc", "wrn-10-1"])
def test_round_trip_gives_identical_outputs(tmp_path, name):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, input_shape=(1, 16, 16), mean=[0.3], std=[0.2]).eval()
    path = tmp_path / "m.safetensors"
    written = save_checkpoint(model, path, _info(model))
    twin, info = load_twin(path)
    x = torch.rand(4, 1, 16, 16)
    assert not twin.training
    assert torch.equal(twin(x), model(x))
    assert info.weights_sha256 == written.weights_sha256 == weights_sha256(model.state_dict())
    assert info.arch_name == name and info.input_shape == [1, 16, 16]


def test_hash_tracks_weights():
    torch.manual_seed(0)
    a = models.create("cnn-small", num_classes=10, input_shape=(1, 8, 8))
    b = models.create("cnn-small", num_classes=10, input_shape=(1, 8, 8))
    b.load_state_dict(a.state_dict())
    assert weights_sha256(a.state_dict()) == weights_sha256(b.state_dict())
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert weights_sha256(a.state_dict()) != weights_sha256(b.state_dict())


def test_trained_checkpoint_metadata_and_accuracy(digits_model):
    path, result = digits_model
    twin, info = load_twin(path)
    test = load_dataset("digits:16", "test")
    acc = (twin(test.x).argmax(1) == test.y).float().mean().item()
    assert acc > 0.9  # the foundation issue's bar for 5 epochs of standard training
    train_set = load_dataset("digits:16", "train")
    assert info.dataset["fingerprint"] == train_set.fingerprint
    assert info.defense == "standard" and info.train_config["epochs_done"] == 5
    assert info.num_classes == 10 and info.class_names == [str(i) for i in range(10)]
    # normalisation recorded in the metadata is the one inside the model
    assert info.normalization["mean"] == pytest.approx([train_set.x.mean().item()], abs=1e-5)
    assert info.normalization["std"] == pytest.approx([train_set.x.std().item()], abs=1e-5)


def test_tampered_weights_are_refused(digits_model, tmp_path):
    path, _ = digits_model
    blob = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", blob[:8])[0]
    blob[8 + header_len + 16] ^= 0xFF  # flip bits inside the first tensor's data
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="sha256"):
        read_checkpoint(bad)


def test_corrupt_and_missing_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(64))
    with pytest.raises(UserError, match="junk.safetensors"):
        read_checkpoint(junk)
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(tmp_path / "missing.safetensors")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, evil)
    with pytest.raises(UserError, match="refusing to load"):
        read_checkpoint(evil)
    assert not marker.exists()


def test_pt_with_metadata_loads_and_bare_state_dict_is_explained(tmp_path):
    torch.manual_seed(0)
    model = models.create("cnn-small", num_classes=10, input_shape=(1, 8, 8)).eval()
    info = _info(model)
    good = tmp_path / "good.pt"
    torch.save({"state_dict": model.state_dict(), "otkit": json.loads(json.dumps(info.to_dict()))}, good)
    twin, _ = load_twin(good)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(twin(x), model(x))
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(UserError, match="weights without otkit metadata"):
        read_checkpoint(bare)


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    model = models.create("cnn-small", num_classes=10, input_shape=(1, 8, 8))
    info = _info(model)
    info.arch = {"kind": "zoo", "config": {**model.config, "num_classes": 5}}
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, info)
    with pytest.raises(UserError, match="do not fit"):
        load_twin(path)


USER_ARCH = '''
import torch.nn as nn

class Net(nn.Module):
    def __init__(self, num_classes, input_shape, hidden=32):
        super().__init__()
        c, h, w = input_shape
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.body(x)
'''


def test_user_architecture_file_is_recorded_and_rebuilt(tmp_path):
    from kit.defenses.trainer import TrainConfig, train

    arch_file = tmp_path / "my_net.py"
    arch_file.write_text(USER_ARCH)
    out = tmp_path / "user.safetensors"
    cfg = TrainConfig(arch=f"{arch_file}:Net", data="digits", epochs=2, arch_kwargs={"hidden": 16})
    result = train(cfg, out)
    with pytest.raises(UserError, match="--arch"):  # the file is imported only when the caller names it
        load_twin(out)
    twin, info = load_twin(out, arch=f"{arch_file}:Net")
    assert info.arch["kind"] == "file" and info.arch["spec"] == f"{arch_file}:Net"
    assert info.arch["kwargs"] == {"hidden": 16}
    x = load_dataset("digits", "test").x[:8]
    assert torch.equal(twin(x), result.model(x))
    with pytest.raises(UserError, match="no class or function"):
        train(TrainConfig(arch=f"{arch_file}:Nope", data="digits", epochs=1), tmp_path / "x.safetensors")
