"""kit.runtime: device resolution and float32 on CUDA (TF32 off), checked without a GPU where torch allows."""

from __future__ import annotations

import pytest
import torch

from kit.errors import UserError
from kit.runtime import ieee_float32, resolve_device


@pytest.fixture
def tf32_flags():
    """Restore torch's TF32 flags after the test (they are process-wide)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_ieee_float32_turns_tf32_off(tf32_flags):
    torch.backends.cudnn.allow_tf32 = True  # torch's own default for convolutions
    torch.backends.cuda.matmul.allow_tf32 = True
    ieee_float32()
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.conv.fp32_precision != "tf32" and torch.backends.cuda.matmul.fp32_precision == "ieee"


def test_a_cuda_device_turns_tf32_off_and_the_cpu_leaves_it(tf32_flags):
    torch.backends.cudnn.allow_tf32 = True
    assert resolve_device("cpu") == torch.device("cpu") and torch.backends.cudnn.allow_tf32
    # a torch.device is taken as given (no availability check), so the CUDA branch runs on any machine
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("spec, needle", [("tpu", "unknown device"), ("mps", "unsupported device"),
                                          ("cuda:99", "CUDA")])
def test_bad_devices_are_user_errors(spec, needle):
    if spec == "cuda:99" and torch.cuda.is_available() and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    with pytest.raises(UserError, match=needle):
        resolve_device(spec)
