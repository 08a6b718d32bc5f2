"""The kit's ``autoattack`` preset against AutoAttack as shipped in ``torchattacks`` (issue 18, an independent
reference).

Both sides attack the same model on the same seeded subset of test examples at each fixed L-inf radius:

* **kit**: the members of :data:`kit.attacks.registry.PRESETS` ``["autoattack"]`` (APGD-CE, APGD-T, FAB-T, Square),
  each built with ``get_attack(name).build(model, seed=0)``, i.e. with the budgets the kit runs per rung of its
  minimum-epsilon search, called at the fixed ``eps``. As AutoAttack does, each member attacks only the examples
  still robust after the previous ones; an example counts robust only if every member fails on it. Every member is
  also run alone on all clean-correct examples (its individual robust accuracy).
* **reference**: ``torchattacks.AutoAttack(model, norm='Linf', eps=eps, version='standard', n_classes=10, seed=0)``
  (torchattacks 3.5.1; peer code, used here only, never a dependency of the kit). Its members are also run alone with
  the same arguments AutoAttack gives them. Note that torchattacks' standard version keeps its classes' default
  ``steps=10`` for APGD, APGD-T and FAB-T (the original AutoAttack uses 100) and gives Square 5000 queries.

Every adversarial that either side reports is re-checked here: the model's prediction on it and its L-inf distance
to the clean input (at most ``eps`` plus 1e-5).

torchattacks is not installed in the project's environment. Make it importable apart from it::

    pip download --no-deps torchattacks==3.5.1 -d /tmp/ta
    pip install --no-deps --target /tmp/ta_pkg /tmp/ta/torchattacks-*.whl
    PYTHONPATH=/tmp/ta_pkg python bench/autoattack_reference.py --data ../shared/data/mnist-10k

torchattacks declares torchvision as a requirement, but no module of torchattacks 3.5.1 imports it (the only
"vision" in its sources is ``from __future__ import division``), so no stub is needed and none is inserted: the script
refuses to go on if importing torchattacks pulled torchvision in, and records ``torchvision_imported`` in its output.
Importing torchattacks does need numpy and scipy (its one-pixel attack), both present in the project's test
environment.

Run::

    PYTHONPATH=/tmp/ta_pkg python bench/autoattack_reference.py --data ../shared/data/mnist-10k \
        [--model CKPT|auto] [--samples 200] [--eps 0.1 0.2 0.3] [--seed 0] [--threads 1]

``--model auto`` (the default) trains a cnn-small with the kit's standard defense on ``mnist:DIR`` for 3 epochs,
cached in bench/.cache. Prints one JSON document on stdout; progress on stderr. The issue's criterion, per radius:
the kit's robust accuracy is at most AutoAttack's plus one example.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

TOL = 1e-5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def import_torchattacks():
    """torchattacks, imported as it is (no stub); refuses if it needed torchvision after all."""
    had_tv = "torchvision" in sys.modules
    try:
        import torchattacks
    except ImportError as e:
        raise SystemExit(f"cannot import torchattacks ({e}); install it apart from the project and set PYTHONPATH "
                         "(see this script's docstring)") from e
    tv = "torchvision" in sys.modules and not had_tv
    if tv:
        raise SystemExit("importing torchattacks imported torchvision: this script assumes it does not")
    return torchattacks, {"version": torchattacks.__version__, "path": str(Path(torchattacks.__file__).parent),
                          "torchvision_imported": tv, "torchvision_stub": False}


def get_model(arg: str, data_dir: Path):
    from kit.checkpoint import load_twin

    if arg != "auto":
        return load_twin(arg)[0], {"checkpoint": arg}
    from kit.defenses.trainer import TrainConfig, train

    cache = HERE / ".cache"
    cache.mkdir(exist_ok=True)
    path = cache / f"cnn-small-mnist-{data_dir.resolve().name}-standard-3.safetensors"
    info = {"checkpoint": str(path), "trained": False, "arch": "cnn-small", "defense": "standard", "epochs": 3,
            "data": f"mnist:{data_dir}"}
    if not path.exists():
        log(f"training cnn-small on mnist:{data_dir} (3 epochs) -> {path}")
        t0 = time.perf_counter()
        train(TrainConfig(defense="standard", arch="cnn-small", data=f"mnist:{data_dir}", epochs=3), path)
        info["trained"] = True
        info["train_seconds"] = round(time.perf_counter() - t0, 1)
    return load_twin(path)[0], info


@torch.no_grad()
def predict(model, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def checked_fooled(model, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[torch.Tensor, int]:
    """Per example: fooled (misclassified) by ``x_adv`` within the ball; and how many ``x_adv`` leave the ball or
    [0, 1] (those count as not fooled)."""
    dist = (x_adv - x).flatten(1).abs().amax(1)
    ok = (dist <= eps + TOL) & (x_adv.flatten(1).amin(1) >= -TOL) & (x_adv.flatten(1).amax(1) <= 1 + TOL)
    fooled = predict(model, x_adv) != y
    return fooled & ok, int((~ok).sum())


def kit_member(model, name: str, x, y, eps: float) -> tuple[torch.Tensor, dict]:
    """Run kit attack ``name`` at ``eps`` on (x, y); per-example fooled (re-checked) and a record."""
    from kit.attacks.registry import get_attack

    spec = get_attack(name)
    atk = spec.build(model, seed=0)
    t0 = time.perf_counter()
    res = atk(x, y, eps=eps)
    dt = time.perf_counter() - t0
    fooled, out_of_ball = checked_fooled(model, x, res.x_adv, y, eps)
    claimed = res.success.bool()
    return fooled, {"config": spec.config(), "attacked": len(x), "fooled": int(fooled.sum()),
                    "claimed_not_verified": int((claimed & ~fooled).sum()),
                    "verified_not_claimed": int((fooled & ~claimed).sum()), "out_of_ball": out_of_ball,
                    "seconds": round(dt, 2)}


def ta_members(ta, model, eps: float) -> list[tuple[str, object]]:
    """The members of torchattacks.AutoAttack(version='standard'), with the arguments it gives them."""
    kw = {"eps": eps, "norm": "Linf", "seed": 0, "verbose": False, "n_restarts": 1}
    return [("apgd-ce", ta.APGD(model, loss="ce", **kw)),
            ("apgd-t", ta.APGDT(model, n_classes=10, **kw)),
            ("fab-t", ta.FAB(model, multi_targeted=True, n_classes=10, **kw)),
            ("square", ta.Square(model, n_queries=5000, **kw))]


def ta_run(model, atk, x, y, eps: float) -> tuple[torch.Tensor, dict]:
    t0 = time.perf_counter()
    x_adv = atk(x, y)
    dt = time.perf_counter() - t0
    fooled, out_of_ball = checked_fooled(model, x, x_adv.detach(), y, eps)
    return fooled, {"attacked": len(x), "fooled": int(fooled.sum()), "out_of_ball": out_of_ball,
                    "seconds": round(dt, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder of the four MNIST IDX files (mnist:DIR)")
    ap.add_argument("--model", default="auto", help="kit checkpoint, or 'auto' (train cnn-small, cached)")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--seed", type=int, default=0, help="seed of the test subset")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for both sides (default 1: on a shared 2-core machine, 2 OpenMP threads "
                    "contending with other jobs made single attacks up to 20x slower)")
    ap.add_argument("--no-individual", action="store_true", help="skip each member run alone (both sides)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    ta, ta_info = import_torchattacks()
    from bench.common import cpu_model, load_average
    from kit.attacks.registry import PRESETS
    from kit.data import load_dataset

    torch.set_num_threads(args.threads)
    model, model_info = get_model(args.model, args.data)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    test = load_dataset(f"mnist:{args.data}", "test")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(test.x), generator=g)[:args.samples].sort().values
    x, y = test.x[idx].float().contiguous(), test.y[idx].long()
    n = len(x)
    clean = predict(model, x) == y
    log(f"{n} examples, clean accuracy {clean.float().mean():.4f}")
    members = PRESETS["autoattack"]

    rows = []
    for eps in args.eps:
        log(f"eps {eps}: kit autoattack ({', '.join(members)})")
        # kit: members in turn on the examples still robust
        robust = clean.clone()
        chain = []
        t0 = time.perf_counter()
        for name in members:
            sel = robust.nonzero().squeeze(1)
            if len(sel) == 0:
                chain.append({"attack": name, "attacked": 0, "fooled": 0})
                continue
            fooled, rec = kit_member(model, name, x[sel], y[sel], eps)
            robust[sel[fooled]] = False
            chain.append({"attack": name, **rec, "robust_after": int(robust.sum())})
            log(f"  kit {name}: {rec['fooled']}/{rec['attacked']} fooled ({rec['seconds']} s)")
        kit_seconds = time.perf_counter() - t0
        kit_robust = robust

        log(f"eps {eps}: torchattacks.AutoAttack")
        aa = ta.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
        t0 = time.perf_counter()
        x_aa = aa(x, y).detach()
        ta_seconds = time.perf_counter() - t0
        ta_fooled, ta_oob = checked_fooled(model, x, x_aa, y, eps)
        ta_robust = ~ta_fooled
        log(f"  torchattacks AutoAttack: robust {int(ta_robust.sum())}/{n} ({ta_seconds:.1f} s)")

        row = {
            "eps": eps,
            "clean_accuracy": float(clean.float().mean()),
            "kit_autoattack_robust_accuracy": float(kit_robust.float().mean()),
            "torchattacks_autoattack_robust_accuracy": float(ta_robust.float().mean()),
            "kit_robust_examples": int(kit_robust.sum()),
            "torchattacks_robust_examples": int(ta_robust.sum()),
            "difference_examples": int(kit_robust.sum()) - int(ta_robust.sum()),
            "criterion_met": int(kit_robust.sum()) <= int(ta_robust.sum()) + 1,
            "robust_kit_only": int((kit_robust & ~ta_robust).sum()),
            "robust_torchattacks_only": int((ta_robust & ~kit_robust).sum()),
            "kit_seconds": round(kit_seconds, 2),
            "torchattacks_seconds": round(ta_seconds, 2),
            "torchattacks_out_of_ball": ta_oob,
            "kit_chain": chain,
        }
        if not args.no_individual:
            sel = clean.nonzero().squeeze(1)
            kit_ind, ta_ind = {}, {}
            for name in members:
                fooled, rec = kit_member(model, name, x[sel], y[sel], eps)
                kit_ind[name] = {"robust_accuracy": (len(sel) - rec["fooled"]) / n, **rec}
                log(f"  kit {name} alone: robust {(len(sel) - rec['fooled']) / n:.3f} ({rec['seconds']} s)")
            for name, atk in ta_members(ta, model, eps):
                fooled, rec = ta_run(model, atk, x[sel], y[sel], eps)
                ta_ind[name] = {"robust_accuracy": (len(sel) - rec["fooled"]) / n, **rec}
                log(f"  torchattacks {name} alone: robust {(len(sel) - rec['fooled']) / n:.3f} ({rec['seconds']} s)")
            row["kit_individual"] = kit_ind
            row["torchattacks_individual"] = ta_ind
        rows.append(row)

    out = {
        "benchmark": "kit autoattack preset vs torchattacks.AutoAttack (issue 18)",
        "criterion": "kit robust examples <= torchattacks robust examples + 1, at every eps",
        "criterion_met": all(r["criterion_met"] for r in rows),
        "samples": n,
        "subset_seed": args.seed,
        "data": f"mnist:{args.data}",
        "model": model_info,
        "kit_preset": list(members),
        "torchattacks": {**ta_info, "autoattack": "AutoAttack(norm='Linf', eps=eps, version='standard', "
                         "n_classes=10, seed=0): APGD-CE, APGD-T, FAB-T (steps=10 each, torchattacks defaults), "
                         "Square (5000 queries)"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads":
                    torch.get_num_threads(), "cpu": cpu_model(), "load_average_at_end": load_average(),
                    "total_seconds": round(time.perf_counter() - t_start, 1)},
        "results": rows,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
