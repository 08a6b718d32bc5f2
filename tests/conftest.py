"""Shared fixtures: a small model trained once per test session on the embedded digits data."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from kit.defenses.trainer import TrainConfig, train

# Two threads on the 2-core CI machine. On a machine shared with other jobs, OpenMP's spinning threads can make small
# ops hundreds of times slower: OTKIT_TEST_THREADS=1 there.
torch.set_num_threads(int(os.environ.get("OTKIT_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _no_ci_environment(monkeypatch):
    """The suite behaves the same inside a CI job: no GitHub Actions detection (--ci auto), no step summary, no
    signing key or password from the environment. Tests of those set them themselves."""
    for name in ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "OTKIT_SIGN_KEY", "OTKIT_SIGN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _quiet_progress():
    """Progress bars off in tests; tests that check them turn them on explicitly."""
    from kit.runtime import set_quiet

    set_quiet(True)
    yield
    set_quiet(False)
    logging.getLogger().handlers.clear()  # click's CliRunner leaves basicConfig handlers on closed streams


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory):
    """A cnn-small trained 5 epochs on digits:16 with standard training: (path, TrainResult)."""
    out = tmp_path_factory.mktemp("digits") / "model.safetensors"
    cfg = TrainConfig(defense="standard", arch="cnn-small", data="digits:16", epochs=5, seed=0)
    result = train(cfg, out)
    return out, result


@pytest.fixture(scope="session")
def digits_exports(digits_model, tmp_path_factory):
    """The digits twin's fp32, fp16 and int8 ONNX exports (the legacy exporter: fast), each checked on 64 test examples,
    int8 calibrated on 128 training examples: ``{"fp32": path, "fp16": path, "int8": path}``."""
    from exporters.onnx import torch_to_onnx, write_onnx_export
    from kit.checkpoint import load_twin
    from kit.data import load_dataset

    path, _ = digits_model
    folder = tmp_path_factory.mktemp("exports")
    model, info = load_twin(path)
    graph = torch_to_onnx(model, info.input_shape, dynamo=False)
    test = load_dataset("digits:16", "test").subset(64, seed=0)
    calib = load_dataset("digits:16", "train").subset(128, seed=0)
    return {p: write_onnx_export(graph, folder / f"{p}.onnx", model, test.x, info=info, parity_y=test.y, precision=p,
                                 calibration_x=calib.x).path for p in ("fp32", "fp16", "int8")}


@pytest.fixture
def one_thread():
    """One torch thread for the test: small tensors and many tiny ops run faster, and steadier on a shared machine.
    Modules that want it everywhere say ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)



@pytest.fixture(scope="session")
def int8_digits(tmp_path_factory):
    """A cnn-small trained 4 short epochs on digits:16 with a plain loop and its int8 Q/DQ export by the kit:
    (model, path to the .onnx, the test split). One thread while it trains: small ops."""
    import torch.nn.functional as F

    import models
    from exporters.onnx import torch_to_onnx, write_onnx_export
    from kit.data import load_dataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        train, test = load_dataset("digits:16", "train"), load_dataset("digits:16", "test")
        model = models.create("cnn-small", 10, (1, 16, 16))
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(4):
            perm = torch.randperm(len(train.x), generator=gen)
            for i in range(0, len(perm), 64):
                b = perm[i:i + 64]
                loss = F.cross_entropy(model(train.x[b]), train.y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        graph = torch_to_onnx(model, (1, 16, 16), dynamo=False)
        parity, calib = test.subset(64, seed=0), train.subset(128, seed=0)
        path = write_onnx_export(graph, tmp_path_factory.mktemp("int8") / "int8.onnx", model, parity.x,
                                 parity_y=parity.y, precision="int8", calibration_x=calib.x).path
    finally:
        torch.set_num_threads(threads)
    return model, path, test
