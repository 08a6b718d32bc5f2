"""kit.runtime: device resolution and float32 on CUDA (TF32 off), checked without a GPU where torch allows."""

from __future__ import annotations

import pytest
import torch

from kit.errors import UserError
from kit.runtime import exact_cuda, resolve_device

_NEW_API = hasattr(torch.backends.cudnn, "conv")  # torch >= 2.9: per-operator fp32_precision settings


def _precision_objects():
    b = torch.backends
    return [b, b.cudnn, b.cudnn.conv, b.cudnn.rnn, b.cuda.matmul] if _NEW_API else []


@pytest.fixture
def tf32_flags():
    """Restore torch's TF32 and cuDNN flags after the test (they are process-wide)."""
    b = torch.backends
    saved = b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark
    saved_new = [o.fp32_precision for o in _precision_objects()]
    yield
    b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark = saved
    for o, v in zip(_precision_objects(), saved_new):  # the generic setting first, then the finer ones
        o.fp32_precision = v


def test_exact_cuda_turns_tf32_off_and_cudnn_deterministic(tf32_flags):
    torch.backends.cudnn.allow_tf32 = True  # torch's own default for convolutions
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    exact_cuda()
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.conv.fp32_precision != "tf32" and torch.backends.cuda.matmul.fp32_precision == "ieee"


@pytest.mark.skipif(not _NEW_API, reason="torch < 2.9 has no fp32_precision settings")
def test_exact_cuda_overrides_tf32_set_through_the_new_api(tf32_flags):
    """A script (or an imported training repo) that asked for TF32 at cuDNN's level through torch's newer API: the
    convolutions' own setting, which their kernels read, ends up IEEE."""
    torch.backends.cudnn.fp32_precision = "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    exact_cuda()
    assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert not torch.backends.cudnn.allow_tf32  # and the legacy reading agrees (torch raises where the two disagree)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_convolutions_are_ieee_float32(tf32_flags):
    """After resolve_device, a convolution on the GPU matches a float64 CPU reference to float32 rounding (TF32, on by
    default for cuDNN, leaves errors of order 1e-3 relative)."""
    torch.backends.cudnn.allow_tf32 = True
    dev = resolve_device("cuda")
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64) / 24)
    x = torch.randn(8, 64, 32, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref = conv(x)
        got = conv.float().to(dev)(x.float().to(dev)).double().cpu()
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
