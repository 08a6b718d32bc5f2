"""Tests of the model zoo (``models``): registry, shapes, in-model normalisation, config round trip, OT-Classifier."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from models import registry

# Every registered architecture, with the wrn-D-W pattern replaced by a concrete small member.
ARCHS = [name if name != "wrn-D-W" else "wrn-10-1" for name in models.list_models()]
SHAPES = [(1, 16, 16), (3, 32, 32), (1, 8, 8)]
# cnn-cw is unpadded and needs >= 16x16; it is tested to refuse 8x8 separately.
CASES = [(a, s) for a in ARCHS for s in SHAPES if not (a == "cnn-cw" and s[1] < 16)]
CASE_IDS = [f"{a}-{'x'.join(map(str, s))}" for a, s in CASES]
NUM_CLASSES = 7


_PRISTINE: dict[str, models.Classifier] = {}


def _build(name: str, shape: tuple[int, int, int], **kwargs: object) -> models.Classifier:
    """A freshly initialised model (seed 0); pristine copies are cached since building ResNet-18 dominates run time."""
    key = repr((name, shape, sorted(kwargs.items())))
    if key not in _PRISTINE:
        torch.manual_seed(0)
        _PRISTINE[key] = models.create(name, NUM_CLASSES, shape, **kwargs)
    return copy.deepcopy(_PRISTINE[key])


def _batch(shape: tuple[int, int, int], n: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand((n, *shape), generator=generator)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_contents() -> None:
    names = models.list_models()
    assert names == ["cnn-small", "cnn-cw", "otc", "resnet20", "resnet18", "wrn-D-W"]
    assert names is not models.list_models()  # a copy: callers cannot corrupt the registry


@pytest.mark.parametrize("name", [*models.list_models(), "wrn-28-10", "WRN-34-10"])
def test_describe_is_one_line(name: str) -> None:
    text = models.describe(name)
    assert text and "\n" not in text and len(text) < 120
    assert any(ch.isdigit() for ch in text)  # cites a year / paper


@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
def test_shapes_and_feature_split(name: str, shape: tuple[int, int, int]) -> None:
    model = _build(name, shape).eval()
    x = _batch(shape, n=3)
    with torch.no_grad():
        logits = model(x)
        z = model.features(x)
        again = model.logits_from_features(z)
    assert logits.shape == (3, NUM_CLASSES)
    assert isinstance(model.feature_dim, int)
    assert z.shape == (3, model.feature_dim)
    assert torch.equal(again, logits)
    assert torch.isfinite(logits).all()
    assert model.num_classes == NUM_CLASSES and model.input_shape == shape


@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
def test_gradient_reaches_input(name: str, shape: tuple[int, int, int]) -> None:
    model = _build(name, shape).eval()
    x = _batch(shape).requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
def test_eval_deterministic_and_mode_switch(name: str, shape: tuple[int, int, int]) -> None:
    model = _build(name, shape).eval()
    x = _batch(shape)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    model.train()
    assert all(m.training for m in model.modules())
    train_out = model(x)
    assert train_out.shape == (2, NUM_CLASSES) and torch.isfinite(train_out).all()
    model.eval()
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        third, fourth = model(x), model(x)
    assert torch.equal(third, fourth) and torch.isfinite(third).all()


@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
def test_normalisation_is_inside_the_model(name: str, shape: tuple[int, int, int]) -> None:
    normalised = _build(name, shape, mean=[0.5], std=[0.25]).eval()
    identity = models.create(name, NUM_CLASSES, shape).eval()
    state = normalised.state_dict()
    assert state["normalize.mean"].flatten().tolist() == [0.5] * shape[0]
    assert state["normalize.std"].flatten().tolist() == [0.25] * shape[0]
    state["normalize.mean"] = torch.zeros_like(state["normalize.mean"])
    state["normalize.std"] = torch.ones_like(state["normalize.std"])
    identity.load_state_dict(state, strict=True)
    assert identity.config["mean"] == [0.0] * shape[0] and identity.config["std"] == [1.0] * shape[0]
    x = _batch(shape)
    with torch.no_grad():
        expected = normalised(x)
        got = identity((x - 0.5) / 0.25)
        plain = identity(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, expected)  # the statistics really do something


@pytest.mark.parametrize(("name", "shape"), CASES, ids=CASE_IDS)
def test_config_round_trip(name: str, shape: tuple[int, int, int]) -> None:
    mean = [0.1307] if shape[0] == 1 else [0.4914, 0.4822, 0.4465]
    std = [0.3081] if shape[0] == 1 else [0.2471, 0.2435, 0.2616]
    model = _build(name, shape, mean=mean, std=std).eval()
    config = json.loads(json.dumps(model.config))  # JSON-serialisable, and survives the trip
    assert config == model.config
    assert config["name"] == name and config["num_classes"] == NUM_CLASSES
    assert config["input_shape"] == list(shape) and config["mean"] == mean and config["std"] == std
    torch.manual_seed(123)  # a different initialisation, overwritten by the state dict
    twin = models.from_config(config).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    x = _batch(shape)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))


def test_config_is_a_fresh_copy() -> None:
    model = _build("cnn-small", (1, 8, 8))
    model.config["name"] = "tampered"
    model.config["mean"].append(3.0)
    assert model.config["name"] == "cnn-small" and model.config["mean"] == [0.0]


def test_wrn_16_2_builds() -> None:
    model = _build("wrn-16-2", (3, 32, 32)).eval()
    assert model.feature_dim == 128 and model.depth == 16 and model.width == 2
    assert model.config["name"] == "wrn-16-2"
    with torch.no_grad():
        assert model(_batch((3, 32, 32))).shape == (2, NUM_CLASSES)
    blocks = [m for m in model.modules() if isinstance(m, models.resnet.WideBasicBlock)]
    assert len(blocks) == 3 * (16 - 4) // 6


@pytest.mark.parametrize("name", ["wrn-27-10", "wrn-x-y", "wrn-4-1", "wrn-28-0", "wrn-28", "wrn-28-10-2", "wrn-D-W"])
def test_bad_wrn_names(name: str) -> None:
    with pytest.raises(ValueError, match=r"\(D - 4\) divisible by 6") as info:
        models.create(name, 10, (3, 32, 32))
    assert name in str(info.value) and "wrn-28-10" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["nope", "resnet", "cnn", ""])
def test_unknown_name(name: str) -> None:
    with pytest.raises(ValueError, match=f"unknown model '{name}'; known: cnn-small, cnn-cw, otc") as info:
        models.create(name, 10, (1, 28, 28))
    assert "wrn-D-W" in str(info.value)
    with pytest.raises(ValueError, match="unknown model"):
        models.describe(name)


def test_names_are_case_insensitive() -> None:
    model = models.create(" ResNet20 ", 10, (3, 8, 8))
    assert model.config["name"] == "resnet20"


@pytest.mark.parametrize("num_classes", [1, 0, -3, 2.0, True, "10", None])
def test_bad_num_classes(num_classes: object) -> None:
    with pytest.raises(ValueError, match="'cnn-small': num_classes must be an integer >= 2"):
        models.create("cnn-small", num_classes, (1, 28, 28))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "shape", [(1, 28), (1, 28, 28, 1), (0, 28, 28), (1, -28, 28), (1, 28.0, 28), (True, 28, 28), "128", None]
)
def test_bad_input_shape(shape: object) -> None:
    with pytest.raises(ValueError, match="input_shape must be three positive integers"):
        models.create("resnet20", 10, shape)  # type: ignore[arg-type]


def test_input_shape_list_accepted() -> None:
    assert models.create("cnn-small", 10, [1, 8, 8]).input_shape == (1, 8, 8)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "minimum", "shape"), [
    ("cnn-cw", 16, (1, 8, 8)),
    ("cnn-cw", 16, (1, 15, 28)),
    ("cnn-cw", 16, (3, 32, 15)),
    ("cnn-small", 4, (1, 3, 3)),
    ("otc", 4, (1, 8, 2)),
])
def test_too_small_inputs(name: str, minimum: int, shape: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match=f"'{name}' needs inputs of at least {minimum}x{minimum} pixels"):
        models.create(name, 10, shape)


@pytest.mark.parametrize("shape", [(1, 16, 16), (1, 4, 4), (3, 5, 7), (1, 1, 1)])
def test_smallest_inputs_work(shape: tuple[int, int, int]) -> None:
    names = ["cnn-cw"] if shape[1] >= 16 else ["cnn-small", "otc"] if shape[1] >= 4 else ["resnet20", "wrn-10-1"]
    for name in names:
        model = _build(name, shape).eval()
        with torch.no_grad():
            assert model(_batch(shape)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mean": [0.1, 0.2]}, "mean has 2 values but the input has 3 channel"),
        ({"std": [0.1, 0.2, 0.3, 0.4]}, "std has 4 values"),
        ({"std": [0.0]}, "std must be strictly positive"),
        ({"std": [-1.0, 1.0, 1.0]}, "std must be strictly positive"),
        ({"mean": [float("nan")]}, "mean must be finite"),
        ({"mean": "abc"}, "mean must be a list of numbers"),
        ({"mean": ["a", "b", "c"]}, "mean must be a list of numbers"),
        ({"dropout": 1.0}, "dropout must be a number in"),
        ({"dropout": -0.1}, "dropout must be a number in"),
        ({"colour": "red"}, "'cnn-cw' has no option.s. colour; accepted: mean, std, dropout"),
    ],
)
def test_bad_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        models.create("cnn-cw", 10, (3, 32, 32), **kwargs)


def test_option_set_by_name_cannot_be_repeated() -> None:
    with pytest.raises(ValueError, match="depth are set by the name"):
        models.create("wrn-16-2", 10, (3, 32, 32), depth=28)


def test_scalar_and_broadcast_statistics() -> None:
    model = models.create("resnet20", 10, (3, 8, 8), mean=[0.5], std=0.25)  # type: ignore[arg-type]
    assert model.config["mean"] == [0.5, 0.5, 0.5] and model.config["std"] == [0.25, 0.25, 0.25]
    assert model.normalize.mean.shape == (1, 3, 1, 1)
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())


def test_check_input() -> None:
    model = models.create("cnn-small", 10, (1, 28, 28))
    model.check_input(torch.rand(5, 1, 28, 28))
    with pytest.raises(ValueError, match=r"expects a batch of shape \(N, 1, 28, 28\), got a 3-d tensor"):
        model.check_input(torch.rand(1, 28, 28))
    with pytest.raises(ValueError, match="expects 1 channel.s., got 3"):
        model.check_input(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="built for 28x28 inputs, got 32x32"):
        model.check_input(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        model.check_input(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty batch"):
        model.check_input(torch.rand(0, 1, 28, 28))
    with pytest.raises(ValueError, match="expects a torch.Tensor"):
        model.check_input([[0.0]])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num_classes": 10, "input_shape": [1, 28, 28]}, "model config lacks name"),
        ({"name": "cnn-small"}, "lacks num_classes, input_shape"),
        ({"name": "nope", "num_classes": 10, "input_shape": [1, 28, 28]}, "unknown model 'nope'"),
        ({"name": "cnn-small", "num_classes": 10, "input_shape": [1, 28, 28], "depth": 3}, "has no option"),
        ([("name", "cnn-small")], "model config must be a dict"),
    ],
)
def test_from_config_errors(config: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        models.from_config(config)  # type: ignore[arg-type]


def test_cnn_small_parameter_count_by_hand() -> None:
    model = models.create("cnn-small", 10, (1, 28, 28))
    conv1 = 1 * 16 * 4 * 4 + 16
    conv2 = 16 * 32 * 4 * 4 + 32
    fc1 = 32 * 7 * 7 * 100 + 100  # 28 -> 14 -> 7
    fc2 = 100 * 10 + 10
    assert _n_params(model) == conv1 + conv2 + fc1 + fc2
    assert model.feature_dim == 100


def test_cnn_cw_parameter_count_by_hand() -> None:
    model = models.create("cnn-cw", 10, (1, 28, 28))
    convs = (1 * 32 * 9 + 32) + (32 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (64 * 64 * 9 + 64)
    fcs = (64 * 4 * 4 * 200 + 200) + (200 * 200 + 200) + (200 * 10 + 10)  # 28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4
    assert _n_params(model) == convs + fcs
    assert model.feature_dim == 200


def test_resnet18_parameter_count() -> None:
    with torch.device("meta"):  # no memory, no initialisation cost
        model = models.create("resnet18", 10, (3, 32, 32))
    assert _n_params(model) == 11_173_962
    assert model.feature_dim == 512


def test_wrn_28_10_parameter_count() -> None:
    with torch.device("meta"):
        model = models.create("wrn-28-10", 10, (3, 32, 32))
    assert _n_params(model) == 36_479_194  # the 36.5M of Zagoruyko & Komodakis (2016), table 1
    assert model.feature_dim == 640


def test_resnet20_is_twenty_layers() -> None:
    model = models.create("resnet20", 10, (3, 32, 32))
    # stem + 3 stages x 3 blocks x 2 convs + head = 20 weighted layers (1x1 projection shortcuts not counted)
    weighted = [
        m for m in model.modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    ]
    assert len(weighted) == 20
    assert model.feature_dim == 64


@pytest.mark.parametrize("name", ARCHS)
def test_batchnorm_only_where_the_paper_has_it(name: str) -> None:
    model = models.create(name, 10, (1, 16, 16))
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert has_bn == (name.startswith("resnet") or name.startswith("wrn"))


def test_dropout_option_recorded_and_active_in_training() -> None:
    model = _build("cnn-cw", (1, 16, 16), dropout=0.5)
    assert model.config["dropout"] == 0.5
    assert models.from_config(model.config).config["dropout"] == 0.5
    x = _batch((1, 16, 16), n=4)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    wrn = _build("wrn-10-1", (3, 8, 8), dropout=0.3)
    assert wrn.config["name"] == "wrn-10-1" and wrn.config["dropout"] == 0.3
    assert "depth" not in wrn.config and "width" not in wrn.config  # encoded in the name


@pytest.mark.parametrize(("channels", "latent"), [(1, 4), (3, 16)])
def test_otc_default_latent(channels: int, latent: int) -> None:
    model = models.create("otc", 10, (channels, 16, 16))
    assert isinstance(model, models.OTClassifier)
    assert model.latent_dim == latent == model.feature_dim == model.config["latent_dim"]


def test_otc_critic_is_saved_but_unused() -> None:
    model = _build("otc", (1, 16, 16), latent_dim=8).eval()
    assert isinstance(model, models.OTClassifier)
    assert model.feature_dim == 8
    assert any(key.startswith("critic.") for key in model.state_dict())
    x = _batch((1, 16, 16))
    with torch.no_grad():
        before, z_before = model(x), model.features(x)
        for p in model.critic.parameters():
            p.add_(torch.randn_like(p))
        after, z_after = model(x), model.features(x)
    assert torch.equal(before, after) and torch.equal(z_before, z_after)
    z = torch.randn(5, 8)
    assert model.critic(z).shape == (5, 1)
    # the deployed network is encoder + classifier only
    with torch.no_grad():
        manual = model.classifier(model.encoder(model.normalize(x)))
    assert torch.equal(manual, before)


def test_otc_bad_latent_dim() -> None:
    with pytest.raises(ValueError, match="latent_dim must be an integer >= 1"):
        models.create("otc", 10, (1, 16, 16), latent_dim=0)


def test_register_custom_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_ENTRIES", list(registry._ENTRIES))  # keep the global registry untouched

    @models.register("tiny-test", "A one-layer test model (this test file)")
    def tiny(
        num_classes: int, input_shape: tuple[int, int, int], *, mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> models.Classifier:
        return models.CNNSmall(num_classes, input_shape, mean, std)

    assert "tiny-test" in models.list_models()
    assert models.describe("tiny-test") == "A one-layer test model (this test file)"
    model = models.create("tiny-test", 3, (1, 8, 8))
    assert model.config["name"] == "tiny-test"  # the registry name wins over the class default
    assert models.from_config(model.config).config == model.config
    with pytest.raises(ValueError, match="already registered"):
        models.register("tiny-test", "again")
    with pytest.raises(ValueError, match="lower-case"):
        models.register("Tiny", "bad")


def test_factory_must_return_a_classifier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_ENTRIES", list(registry._ENTRIES))
    bad: Callable[..., nn.Module] = lambda num_classes, input_shape: nn.Linear(1, 1)  # noqa: E731
    models.register("not-a-classifier", "broken")(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a Classifier"):
        models.create("not-a-classifier", 10, (1, 8, 8))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_normalisation_survives_onnx_export(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = _build("cnn-small", (1, 16, 16), mean=[0.1307], std=[0.3081]).eval()
    x = _batch((1, 16, 16), n=3)
    path = tmp_path / "cnn-small.onnx"
    torch.onnx.export(
        model, (x,), str(path), input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)
