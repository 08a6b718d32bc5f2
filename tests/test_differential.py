"""Engine-only attacks (#18): the fake-quant replica of an int8 Q/DQ graph and the differential attack.

The replica (``OnnxModule(proto, fake_quant=True)``) is checked against ONNX Runtime, on single Q/DQ pairs (exact) and
on the kit's int8 export of a zoo model trained here (far closer than the float twin). The differential attack
(kit.attacks.differential) is checked on a toy pair whose replica differs from the twin only in one region, and on
that int8 export judged by ONNX Runtime on the real file, against PGD on the twin at the same radius. Run with ``-s``
to see the measured numbers.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import models
from exporters.engines import load_engine
from kit.attacks.base import lp_norm
from kit.attacks.differential import Differential, HalfPrecision, differential_objective, engine_only
from kit.attacks.pgd import PGD
from kit.attacks.search import min_eps_search
from kit.errors import UserError
from kit.twins.from_onnx import OnnxModule, graph_skeleton, onnx_to_torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _within(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: str) -> None:
    """(c): every adversarial lies in [0, 1] and within its radius."""
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    bound = torch.as_tensor(eps, dtype=x.dtype) * (1 + 1e-5) + 1e-7
    assert bool((lp_norm(x_adv - x, norm) <= bound).all())


# ----------------------------------------------------------------------------------------- fake quantisation, unit
def _qdq_graph(scale, zero_point, axis: int | None, dtype=np.int8, shape=(3, 4, 5, 5)) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "s")]
    names = ["X", "s"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(np.asarray(zero_point, dtype), "z"))
        names.append("z")
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", names, ["Q"], **attrs),
             helper.make_node("DequantizeLinear", ["Q", *names[1:]], ["Y"], **attrs)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


_QDQ = {
    "int8_per_tensor": (0.02, 3, None, np.int8),
    "int8_per_axis": ([0.01, 0.03, 0.05, 0.2], [0, 1, -2, 3], 1, np.int8),
    "uint8_zero_point": (0.01, 128, None, np.uint8),
    "uint8_default": (0.015, None, None, np.uint8),
}


@pytest.mark.parametrize("name", sorted(_QDQ))
def test_fake_quant_pair_is_onnxruntime_exactly(name):
    scale, zp, axis, dtype = _QDQ[name]
    proto = _qdq_graph(scale, zp, axis, dtype)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 4, 5, 5)) * 2).astype(np.float32)  # well past the int8 range at scale 0.02
    s = np.asarray(scale, np.float32).reshape(-1, 1, 1) if axis is not None else np.float32(scale)
    x[0] = ((np.arange(100).reshape(4, 5, 5) - 50) + 0.5).astype(np.float32) * s  # ties: half to even
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = torch.from_numpy(sess.run(None, {"X": x})[0])
    replica = OnnxModule(proto, fake_quant=True)
    xt = torch.from_numpy(x).requires_grad_(True)
    got = replica(xt)
    torch.testing.assert_close(got.detach(), ref, atol=0, rtol=0)
    assert not torch.equal(ref, torch.from_numpy(x))  # the pair does round and saturate
    assert replica.report["fake_quant"] is True and replica.report["fake_quant_activation_pairs"] == 1
    assert replica.report["qdq_activation_pairs_dropped"] == 0
    # the clipped straight-through gradient: 1 where round(x / s) + z is inside the integer range, 0 where it saturates
    got.sum().backward()
    info = np.iinfo(dtype)
    r = np.round(x / s) + (np.asarray(zp, np.float32).reshape(-1, 1, 1) if axis is not None else (zp or 0))
    inside = torch.from_numpy((r >= info.min) & (r <= info.max))
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(xt.grad, inside.float(), atol=1e-6, rtol=0)
    # and the float twin of the same graph is the identity
    torch.testing.assert_close(OnnxModule(proto)(torch.from_numpy(x)), torch.from_numpy(x), atol=0, rtol=0)


def test_default_stays_the_float_twin():
    proto = _qdq_graph(0.02, 3, None)
    twin = OnnxModule(proto)
    assert "fake_quant" not in twin.report and twin.report["qdq_activation_pairs_dropped"] == 1
    assert [s.op_type for s in twin._steps] == ["DequantizeLinear"]  # the pair's Q dropped, the DQ an alias
    replica = OnnxModule(proto, fake_quant=True)
    assert [s.op_type for s in replica._steps] == ["QuantizeLinear", "DequantizeLinear"]
    assert set(twin.state_dict()) == set(replica.state_dict())  # same buffers: one checkpoint serves both


# -------------------------------------------------------------------------------- the kit's int8 export of a model
@pytest.fixture(scope="module")
def int8_export(int8_digits):
    """The session's int8 export of a briefly trained cnn-small (tests/conftest.py), with its proto and ONNX Runtime
    engine: (model, path, proto, engine, test dataset)."""
    model, path, test = int8_digits
    return model, path, onnx.load(str(path)), load_engine(path), test


def _gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    return float((a - b).abs().max()), float((a.argmax(1) == b.argmax(1)).float().mean())


def test_replica_matches_the_int8_engine_far_better_than_the_float_twin(int8_export):
    model, path, proto, engine, test = int8_export
    twin = OnnxModule(proto).eval()
    replica = onnx_to_torch(path, fake_quant=True).eval()
    r = replica.report
    n_q = sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    assert r["fake_quant"] and r["fake_quant_activation_pairs"] == n_q > 0 and r["dequantized_weights"] > 0
    samples = {"digits": test.subset(128, seed=2).x,
               "random": torch.rand(128, 1, 16, 16, generator=torch.Generator().manual_seed(3))}
    for what, x in samples.items():
        with torch.no_grad():
            ref, z_rep, z_twin, z_torch = engine(x), replica(x), twin(x), model(x)
        (err_rep, agr_rep), (err_twin, agr_twin) = _gap(z_rep, ref), _gap(z_twin, ref)
        err_torch, agr_torch = _gap(z_torch, ref)
        print(f"\n{what}: vs ORT int8 (logit scale {float(ref.abs().max()):.3g}): replica max|dlogit| {err_rep:.3g} "
              f"top-1 {agr_rep:.3f}; float twin {err_twin:.3g} top-1 {agr_twin:.3f}; torch model {err_torch:.3g} "
              f"top-1 {agr_torch:.3f}")
        # per example, not the largest gap of the batch: an activation that lands on a rounding boundary of its
        # quantiser can round one step apart in the two runtimes (float sums in another order), which moves that one
        # example's logits by a step's worth (0.15 on one of 128 random images on an AVX-512 VNNI CPU, 0 elsewhere)
        rep, flt = (z_rep - ref).abs().amax(1), (z_twin - ref).abs().amax(1)
        assert float(flt.mean()) > 0 and float(rep.mean()) <= 0.25 * float(flt.mean()), (err_rep, err_twin)
        assert float(rep.median()) <= 0.1 * float(flt.median()), (float(rep.median()), float(flt.median()))
        assert agr_rep >= agr_twin and agr_rep >= 0.99
    # gradients flow through the fake quantisation (straight-through), and a checkpoint skeleton rebuilds it
    x = samples["digits"][:16].clone().requires_grad_(True)
    F.cross_entropy(replica(x), test.subset(128, seed=2).y[:16]).backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    rebuilt = OnnxModule.from_skeleton(graph_skeleton(proto), fake_quant=True)
    rebuilt.load_state_dict(twin.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(samples["random"]), replica(samples["random"]))


# ------------------------------------------------------------------------------------------ the differential attack
class _Twin(nn.Module):
    """Two classes, linear: the score depends on the first 8 of 16 pixels only."""

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * (x.flatten(1)[:, :8].mean(1) - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.score(x)
        return torch.stack([-s / 2, s / 2], 1)


class _Replica(_Twin):
    """The twin, but where the mean of the other 8 pixels passes 0.55 (a region the twin ignores) the class flips."""

    def score(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(60 * (x.flatten(1)[:, 8:].mean(1) - 0.55))
        return super().score(x) * (1 - 2 * g)


@pytest.fixture(scope="module")
def toy():
    twin, replica = _Twin(), _Replica()
    x = 0.2 + 0.6 * torch.rand(400, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = twin(x).argmax(1)
        keep = (replica(x).argmax(1) == y) & (twin.score(x).abs() > 0.6)  # both right, twin robust at L-inf 0.05
    return twin, replica, x[keep], y[keep]


def test_differential_finds_engine_only_adversarials_pgd_misses(toy):
    """(a) The replica differs only where the other pixels' mean exceeds 0.55: PGD on the twin never looks there."""
    twin, replica, x, y = toy
    eps = 0.05
    with torch.no_grad():  # reachable: pushing the other 8 pixels up by eps crosses into the region
        reachable = int((x.flatten(1)[:, 8:].clamp(max=1 - eps) + eps).mean(1).gt(0.55).sum())
    pgd = PGD(twin, eps, steps=20)
    pgd.judge = lambda xa, yy: replica(xa).argmax(1) != yy  # twin-guided, judged by the "engine"
    res_pgd = pgd(x, y)
    counts = {"pgd": int(engine_only(res_pgd.x_adv, y, twin, replica).sum())}
    for objective in ("margin", "diva", "ce"):
        res = Differential(twin, replica, eps, steps=20, objective=objective)(x, y)
        only = engine_only(res.x_adv, y, twin, replica)
        assert torch.equal(only, res.success)  # evasive: every success is engine-only
        _within(res.x_adv, x, eps, "linf")
        counts[objective] = int(only.sum())
    print(f"\ntoy, {len(x)} examples, L-inf {eps}: engine-only reachable {reachable}, found {counts}")
    assert counts["pgd"] <= reachable // 4
    for objective in ("margin", "diva", "ce"):
        assert counts[objective] >= max(0.9 * reachable, 2 * counts["pgd"] + 10), counts
    # L2, and the minimum-epsilon search (per-example radii, warm starts) with the replica judging
    res2 = Differential(twin, replica, 0.4, norm="l2", steps=20)(x, y)
    _within(res2.x_adv, x, 0.4, "l2")
    assert int(res2.success.sum()) > counts["pgd"]
    search = min_eps_search(Differential(twin, replica, steps=20), x, y, 0.08, rungs=3)
    found = torch.isfinite(search.eps_star)
    assert found.sum() >= counts["margin"] and bool(engine_only(search.x_adv[found], y[found], twin, replica).all())
    _within(search.x_adv[found], x[found], search.eps_star[found].float(), "linf")


def test_differential_beats_pgd_on_the_int8_engine(int8_export):
    """(b) Judged by ONNX Runtime on the real int8 file, with the fake-quant replica's gradients."""
    model, path, proto, engine, test = int8_export
    replica = OnnxModule(proto, fake_quant=True).eval()
    data = test.subset(256, seed=1)
    with torch.no_grad():
        both = (model(data.x).argmax(1) == data.y) & (engine(data.x).argmax(1) == data.y)
    x, y = data.x[both], data.y[both]

    def judge(xa: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return engine(xa).argmax(1) != yy

    eps = 0.03
    pgd = PGD(model, eps, steps=20)
    pgd.judge = judge
    res_pgd = pgd(x, y)
    diff = Differential(model, replica, eps, steps=20)
    diff.judge = judge
    res_diff = diff(x, y)
    n_pgd = int(engine_only(res_pgd.x_adv, y, model, engine).sum())
    only = engine_only(res_diff.x_adv, y, model, engine)
    print(f"\nint8 cnn-small, {len(x)} digits, L-inf {eps}, 20 steps: engine-only adversarials (ORT judging) "
          f"differential {int(only.sum())}, PGD on the twin {n_pgd} (PGD fooled the engine on "
          f"{int(res_pgd.success.sum())})")
    assert torch.equal(only, res_diff.success) and int(only.sum()) >= max(n_pgd, 1)
    _within(res_diff.x_adv, x, eps, "linf")
    assert int(res_diff.forwards.max()) <= 2 * (1 + 21)
    # L2 on a few: within the ball too
    res_l2 = Differential(model, replica, 0.5, norm="l2", steps=10)(x[:32], y[:32])
    _within(res_l2.x_adv, x[:32], 0.5, "l2")


# ------------------------------------------------------------------------------------------------------ the pieces
def test_objectives_by_hand():
    twin = torch.tensor([[2.0, 0.0, 1.0], [3.0, 0.0, 0.0]])
    rep = torch.tensor([[0.5, 1.0, 0.0], [1.0, 1.0, 0.0]])
    y = torch.tensor([0, 1])
    # margins: twin [-1, +3], replica [+0.5, 0]
    torch.testing.assert_close(differential_objective("margin", twin, rep, y), torch.tensor([0.5, 0.0 - 3.0]))
    torch.testing.assert_close(differential_objective("margin", twin, rep, y, c=0.5), torch.tensor([0.5, -1.5]))
    p_t, p_r = twin.softmax(1)[[0, 1], y], rep.softmax(1)[[0, 1], y]
    torch.testing.assert_close(differential_objective("diva", twin, rep, y, c=2.0), p_t - 2 * p_r)
    torch.testing.assert_close(differential_objective("ce", twin, rep, y), p_t.log() - p_r.log())


def test_arguments_are_checked(toy):
    twin, replica, x, y = toy
    for kwargs in (dict(objective="kl"), dict(c=-1.0), dict(c=float("nan")), dict(steps=0), dict(restarts=0),
                   dict(norm="wasserstein"), dict(rel_step=0.0)):
        with pytest.raises(UserError):
            Differential(twin, replica, 0.1, **kwargs)
    with pytest.raises(UserError, match="replica"):
        Differential(twin, "engine.onnx", 0.1)
    # the replica's mode is restored after the attack
    replica.train()
    Differential(twin, replica, 0.01, steps=2)(x[:4], y[:4])
    assert replica.training
    replica.eval()
    assert "objective='margin'" in repr(Differential(twin, replica, 0.1))


def test_half_precision_replica():
    torch.manual_seed(0)
    model = models.create("cnn-small", 10, (1, 16, 16)).eval()
    half = HalfPrecision(model).eval()
    assert next(model.parameters()).dtype == torch.float32  # the twin is untouched
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    z = half(x)
    with torch.no_grad():
        gap = float((z - model(x)).abs().max())
    assert z.dtype == torch.float32 and 0 < gap < 1e-2
    z.logsumexp(1).sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
