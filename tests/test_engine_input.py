"""Foreign engines' input conventions: normalised, 0-255, NHWC and uint8 input, mapped outside the engine.

Each foreign engine here is the digits twin wrapped so that it takes another input (what a user's own export takes),
exported by torch.onnx and run by ONNX Runtime. With the right ``--engine-input`` the audit must find the engine
equal to its twin (``match``); with a wrong one it must say the clean comparison failed and exit 1 (or 2 for a shape
that cannot fit), never 0 and never a traceback.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

from kit.convention import IDENTITY, InputConvention, InputModule, parse_convention
from kit.errors import UserError
from tests.clitools import assert_user_error, run


# --------------------------------------------------------------------------------------------- the value object
def test_parse_and_text_round_trip():
    conv = parse_convention("range=0,255; mean=123.7,116.3,103.5 std=58.4,57.1,57.4;layout=NHWC")
    assert conv.range == (0.0, 255.0) and conv.mean == (123.7, 116.3, 103.5) and conv.layout == "nhwc"
    assert parse_convention(str(conv)) == conv
    assert InputConvention.from_dict(json.loads(json.dumps(conv.to_dict()))) == conv
    assert parse_convention("identity") == IDENTITY and IDENTITY.identity and str(IDENTITY) == "identity"
    assert parse_convention("imagenet").std == (0.229, 0.224, 0.225)
    assert parse_convention("dtype=uint8").range == (0.0, 255.0)  # uint8 means 0-255
    assert parse_convention("range=255").range == (0.0, 255.0)


@pytest.mark.parametrize("text, needle", [
    ("range=1,0", "HI > LO"), ("std=0", "positive"), ("layout=chw", "layout"), ("dtype=int8", "dtype"),
    ("dtype=uint8;mean=0.5", "uint8"), ("bogus=1", "unknown input convention field"), ("resnet", "unknown input"),
    ("mean=a,b", "numbers"), ("range=0,1,2", "LO,HI"), ("mean=1,2;std=1,2,3", "mean has 2"),
])
def test_bad_descriptions_are_one_line_errors(text, needle):
    with pytest.raises(UserError, match=needle):
        parse_convention(text)


def test_to_native_against_hand_computed_values():
    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    conv = parse_convention("range=0,255;mean=10,20,30;std=2,4,8;layout=nhwc")
    want = ((x * 255 - torch.tensor([10.0, 20, 30]).view(1, 3, 1, 1)) / torch.tensor([2.0, 4, 8]).view(1, 3, 1, 1))
    torch.testing.assert_close(conv.to_native(x), want.permute(0, 2, 3, 1), rtol=0, atol=1e-5)
    u8 = parse_convention("dtype=uint8").to_native(x)
    assert u8.dtype == torch.uint8 and torch.equal(u8, (x * 255).round().to(torch.uint8))
    assert parse_convention("range=-1,1").to_native(x).min() >= -1


def test_input_module_is_differentiable_and_exact():
    """The folded twin's gradient w.r.t. pixels is the chain rule through the affine map (a closed form)."""
    lin = nn.Linear(3, 2, bias=False)
    conv = parse_convention("mean=0.5;std=0.25")
    twin = InputModule(nn.Sequential(nn.Flatten(), lin), conv)
    x = torch.rand(1, 3, 1, 1, requires_grad=True)
    twin(x)[0, 0].backward()
    torch.testing.assert_close(x.grad.view(3), lin.weight[0].detach() / 0.25)


# --------------------------------------------------------------------------------------------- foreign engines
class _Foreign(nn.Module):
    """The twin behind another input convention: ``forward(native) = twin(kit pixels)``."""

    def __init__(self, twin: nn.Module, kind: str) -> None:
        super().__init__()
        self.twin, self.kind = twin, kind

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "normalised":
            x = z * 0.25 + 0.5
        elif self.kind == "nhwc":
            x = z.permute(0, 3, 1, 2)
        elif self.kind == "0-255":
            x = z / 255.0
        else:  # uint8
            x = z.to(torch.float32) / 255.0
        return self.twin(x)


RIGHT = {"normalised": "mean=0.5;std=0.25", "nhwc": "layout=nhwc", "0-255": "range=0,255", "uint8": "dtype=uint8"}


@pytest.fixture(scope="module")
def foreign(digits_model, tmp_path_factory):
    """One ONNX file per convention, exported as a user would (torch.onnx.export, no kit metadata)."""
    from kit.checkpoint import load_twin

    twin, info = load_twin(digits_model[0])
    c, h, w = info.input_shape
    folder = tmp_path_factory.mktemp("foreign")
    files = {}
    for kind in RIGHT:
        shape = (2, h, w, c) if kind == "nhwc" else (2, c, h, w)
        example = torch.randint(0, 256, shape, dtype=torch.uint8) if kind == "uint8" else torch.rand(shape)
        path = folder / f"{kind}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Foreign(twin, kind).eval(), (example,), str(path), dynamo=False, opset_version=18,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}})
        files[kind] = path
    return digits_model[0], files


AUDIT = ["--attack", "pgd-linf@0.3", "--samples", "32", "--batch-size", "32", "--rungs", "3",
         "--blackbox-samples", "0", "--data", "digits:16", "--allow-flag", "test-blind"]


@pytest.mark.parametrize("kind", list(RIGHT))
def test_audit_with_the_right_engine_input_matches(foreign, kind, tmp_path):
    twin, files = foreign
    res = run("-q", "audit", "--engine", files[kind], "--twin", twin, "--engine-input", RIGHT[kind], *AUDIT,
              "--out", tmp_path / "r", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["verdict"] == "match" and doc["clean"]["top1_agreement"] == 1.0
    assert doc["engine"]["input_convention"] == parse_convention(RIGHT[kind]).to_dict()
    # the engine computes what the twin computes: the search finds the same eps* on both sides (fp32)
    rec = doc["attacks"][0]
    assert rec["engine"]["auac"] == pytest.approx(rec["twin"]["auac"], abs=0.02)


@pytest.mark.parametrize("kind, wrong", [("normalised", None), ("0-255", "range=0,1"), ("uint8", "range=0,255"),
                                         ("normalised", "mnist"), ("normalised", "imagenet")])
def test_audit_with_a_wrong_engine_input_fails_saying_so(foreign, kind, wrong, tmp_path):
    twin, files = foreign
    flags = [] if wrong is None else ["--engine-input", wrong]
    res = run("-q", "audit", "--engine", files[kind], "--twin", twin, *flags, *AUDIT, "--out", tmp_path / "r")
    assert "Traceback" not in res.output
    if kind == "uint8":  # a float description of a uint8 input cannot feed it: an input error
        assert_user_error(res, "uint8")
        return
    if wrong == "imagenet":  # three channels' statistics for a one-channel engine: an input error
        assert_user_error(res, "1 channel(s)", "mean has 3 values")
        return
    assert res.exit_code == 1, res.output
    assert "clean top-1 agreement" in res.stderr and "--engine-input" in res.stderr
    assert "verdict: mismatch" in res.stdout


def test_nhwc_engine_without_layout_is_refused_with_a_hint(foreign, tmp_path):
    twin, files = foreign
    res = run("-q", "audit", "--engine", files["nhwc"], "--twin", twin, *AUDIT, "--out", tmp_path / "r")
    assert_user_error(res, "layout=nhwc")
    assert not (tmp_path / "r").exists()


def test_kit_exports_record_their_input_and_refuse_a_contradiction(digits_model, tmp_path):
    from exporters.checkpoint import export_checkpoint
    from exporters.engines import load_engine

    onnx_path = export_checkpoint(digits_model[0], "onnx", tmp_path / "m.onnx").path
    eng = load_engine(onnx_path)
    assert eng.input_convention == IDENTITY and eng.describe()["input_convention"] == IDENTITY.to_dict()
    res = run("engine", "run", onnx_path, "--data", "digits:16", "--samples", "8", "--engine-input", "range=0,255")
    assert_user_error(res, "contradicts", "records its input")


def test_engine_run_compares_a_foreign_engine_with_its_twin(foreign):
    twin, files = foreign
    res = run("engine", "run", files["uint8"], "--data", "digits:16", "--samples", "64", "--engine-input",
              "dtype=uint8", "--twin", twin, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    # the twin is given the pixels the uint8 engine sees (rounded to 1/255): FP32 parity holds
    assert doc["parity"]["verdict"] == "pass" and doc["parity"]["top1_agreement"] == 1.0
    assert doc["engine"]["input_convention"]["dtype"] == "uint8"


def test_a_uint8_engine_is_its_own_twin(foreign, tmp_path):
    """The twin rebuilt from a uint8 graph takes the same 0-255 values unrounded; the audit matches."""
    _, files = foreign
    res = run("-q", "audit", "--engine", files["uint8"], "--twin", files["uint8"], "--engine-input", "dtype=uint8",
              *AUDIT, "--out", tmp_path / "r", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["verdict"] == "match" and doc["twin"]["input_convention"]["range"] == [0.0, 255.0]
