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


@pytest.fixture
def one_thread():
    """One torch thread for the test: small tensors and many tiny ops run faster, and steadier on a shared machine.
    Modules that want it everywhere say ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

