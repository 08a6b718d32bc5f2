"""Replay what an audit report says about the audited examples themselves, with the engine (and twin) at hand.

:mod:`evaluators.recompute` re-derives every figure that follows from the stored eps*; this module checks the eps*
and the stored adversarials against the data and the models, at the cost of one clean forward pass per model:

- **The examples.** The report names its dataset (spec, split), the subset's size and seed, and the subset's sha256
  fingerprint: the same subset is drawn again and must have that fingerprint.
- **Clean predictions.** The engine's (and the twin's, when given) accuracy on those examples must be the stored one,
  and an example's eps* on a side must be 0 exactly where that side misclassifies it clean: an example a model gets
  wrong without any perturbation cannot be robust, and one it gets right was not fooled at radius 0.
- **The clean comparison** (with the twin): the engine's and the twin's logits on those examples are compared again
  as the audit compares them today (:func:`evaluators.audit.clean_record`, the report's runtime): the stored top-1
  agreement must be what they show, the stored logit-gap tolerance no looser than the one the audit sets (within
  :data:`GAP_SLACK` of it), the stored largest logit gap within :data:`GAP_SLACK` of that tolerance of the gap measured
  again (where the engine runs where the audit's did), and the clean verdict of the measured figures the stored one.
  The spot check's examples (``clean.spot_check``) are drawn again with its recorded seed, must have its fingerprint,
  and are compared the same way; verify also draws a spot check of its own (:func:`_clean_checks`).
- **Radii.** Every attack's eps_max lies within the largest distance two images can have under its norm
  (:func:`evaluators.evaluate.largest_radius`).
- **Adversarials.** Each stored L-inf / L2 adversarial has the stored label, and its distance to its clean example is
  the stored eps* (eps* is the measured norm of the adversarial found). A Wasserstein radius is the cost of a
  transport plan that is not stored, so only the label is checked for those.

What still cannot be checked without running the attacks again: that an example the report calls robust up to
eps_max really resisted them (``otkit verify`` re-runs stored adversarials, not the search).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from evaluators.evaluate import largest_radius
from evaluators.recompute import eps_array
from kit.attacks.base import LP_NORMS, Norm, lp_norm
from kit.errors import UserError

__all__ = ["audited_examples", "replay_report"]

#: relative (and absolute) slack between a stored distance and the one measured again (float32 pixels)
DISTANCE_TOLERANCE = 1e-5

#: A stored logit-gap tolerance may exceed the one the audit sets by this fraction of it, and a stored largest logit
#: gap may differ from the one measured again by this fraction of that tolerance: another CPU's or runtime's rounding
#: moves a gap by far less (fp32: about 1e-6 against a tolerance of about 1e-3), a forged figure by more.
GAP_SLACK = 0.1


def audited_examples(doc: Mapping[str, Any], spec: str | None = None, split: Any = None) -> Any:
    """The audited examples, drawn again from the report's dataset (or ``spec``, the same data elsewhere; or from
    ``split``, that whole split already loaded).

    Raises
    ------
    UserError
        The dataset cannot be read here, or the drawn subset's fingerprint is not the report's.
    """
    data = doc["data"]
    source = spec or data["spec"]
    ds = (split if split is not None else _split(doc, spec)).subset(int(data["n"]), seed=int(data["seed"]),
                                                                     notice=False)
    if ds.fingerprint != data["fingerprint"] or len(ds) != data["n"]:
        raise UserError(f"the {data['n']} examples drawn from {source} ({data['split']} split, seed {data['seed']}) "
                        f"have fingerprint {ds.fingerprint}, the report says {data['fingerprint']}: other data")
    return ds


def random_picks(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)``, drawn from the operating system's entropy and sorted (all of them when ``k >= n``): what
    ``otkit verify`` checks again, so that an edit cannot be placed where the check is known not to look."""
    if k >= n:
        return list(range(n))
    return sorted(secrets.SystemRandom().sample(range(n), k))


def _split(doc: Mapping[str, Any], spec: str | None) -> Any:
    """The report's whole split (``spec``: the same data elsewhere)."""
    from kit.data import load_dataset

    return load_dataset(spec or doc["data"]["spec"], doc["data"]["split"], seed=0)


@torch.no_grad()
def _predictions(model: Any, x: torch.Tensor, device: torch.device, batch: int = 256) -> np.ndarray:
    out = [model(x[i : i + batch].to(device)).argmax(1).cpu() for i in range(0, len(x), batch)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def _side(doc: Mapping[str, Any], side: str, pred: np.ndarray, y: np.ndarray, out: list[str]) -> None:
    """Stored clean accuracy and eps* = 0 against one model's clean predictions."""
    wrong = pred != y
    n = len(y)
    stored = doc["clean"][f"{side}_accuracy"]
    acc = float((~wrong).sum()) / n
    if stored is None or abs(float(stored) - acc) > 0.5 / n:
        out.append(f"clean.{side}_accuracy: report says {stored}, the {side} classifies {int((~wrong).sum())} of {n} "
                   f"audited examples correctly ({acc:.4f})")
    for a in doc["attacks"]:
        eps = eps_array(a[side]["eps_star"])
        robust_but_wrong = np.flatnonzero(wrong & (eps > 0))
        zero_but_right = np.flatnonzero(~wrong & (eps == 0))
        for idx, what in ((robust_but_wrong, f"misclassified clean by the {side} but stored with eps* > 0"),
                          (zero_but_right, f"classified correctly by the {side} but stored with eps* = 0")):
            if idx.size:
                shown = ", ".join(map(str, idx[:5].tolist())) + (" ..." if idx.size > 5 else "")
                out.append(f"attacks[{a['name']}].{side}.eps_star: {idx.size} example(s) {what} ({shown})")


def _runtime(doc: Mapping[str, Any]) -> str:
    """Whose FP32 tolerance the audit held the engine to (:attr:`exporters.base.Engine.parity_runtime`)."""
    e = doc["engine"]
    return "tensorrt" if e.get("format") == "tensorrt" or "TensorrtExecutionProvider" in (e.get("providers") or []) \
        else "onnxruntime"


def _same_place(doc: Mapping[str, Any], engine: Any, device: torch.device) -> bool:
    """Whether this engine computes where the audit's did: the same device type and ONNX Runtime providers (another
    CPU or GPU model may still round a little differently, which the slack of the comparisons allows)."""
    audited = str(doc["provenance"].get("device", "")).split(":")[0]
    providers = list(getattr(engine, "providers", []) or [])
    return audited == device.type and providers == list(doc["engine"].get("providers") or [])


def _clean(doc: Mapping[str, Any], said: Mapping[str, Any], where: str, engine: Any, twin: Any, x: torch.Tensor,
           y: torch.Tensor, same_place: bool, out: list[str]) -> tuple[str, str]:
    """A clean comparison (``said``: the report's ``clean`` or its ``spot_check``, named ``where``) measured again as
    the audit measures it today, against the stored one (module docstring); returns the verdict and reason measured.

    The verdict is judged by today's rules whatever the report's age (an honest report of a faithful engine passes
    them; a field deleted from a report changes nothing here), except that a report written before the exact test
    (no ``p_value``) was judged by the plain threshold, as :func:`evaluators.recompute.rederive` does. Where the engine
    runs elsewhere than the audit's did, the agreement may differ by one example or 1 %, an fp16 tolerance by a factor
    of two (it is measured on the machine), and the stored gap is not compared with the measured one."""
    from evaluators.audit import Tolerances, clean_record, clean_verdict

    tols = Tolerances(**doc["tolerances"])
    with torch.no_grad():
        got = clean_record(twin, engine, x, y, 256, tols, runtime=_runtime(doc))
    n = len(y)
    agree = got["top1_agreement"]
    slack = 0.5 if same_place else max(1.5, 0.01 * n)
    if abs(float(said["top1_agreement"]) - agree) * n > slack:
        out.append(f"{where}.top1_agreement: report says {said['top1_agreement']}, the engine and the twin agree on "
                   f"{round(agree * n)} of {n} examples ({agree:.4f})")
    tol, tol_said = got["max_logit_gap_tolerance"], said.get("max_logit_gap_tolerance")
    room = 1 + GAP_SLACK if same_place or doc["engine"].get("precision") != "fp16" else 2.0
    if tol is not None and tol_said is not None and tol_said > tol * room:
        out.append(f"{where}.max_logit_gap_tolerance: report says {tol_said}, the audit sets {tol:.6g} for this "
                   "engine and twin")
    gap, gap_said = got["max_logit_gap"], said["max_logit_gap"]
    if (gap is None) != (gap_said is None):
        out.append(f"{where}.max_logit_gap: report says {gap_said}, measured again "
                   f"{'not finite' if gap is None else f'{gap:.6g}'}")
    elif gap is not None and tol is not None and same_place and abs(gap - float(gap_said)) > GAP_SLACK * tol:
        out.append(f"{where}.max_logit_gap: report says {gap_said}, measured again {gap:.6g} (tolerance {tol:.6g})")
    if "p_value" in said:
        return got["verdict"], got["reason"]
    return clean_verdict(agree, tols, gap, tol), f"clean top-1 agreement {agree:.4f}, max logit gap {gap}"


def _clean_checks(doc: Mapping[str, Any], engine: Any, twin: Any, ds: Any, split: Any, device: torch.device,
                  out: list[str]) -> None:
    """The clean comparison on the audited examples, on the report's spot check (drawn again with its seed) and on a
    spot check of verify's own (drawn with its own entropy: a report that drops its spot check does not escape one)."""
    from evaluators.audit import AuditConfig, Tolerances, clean_record, combine_clean

    same = _same_place(doc, engine, device)
    c = doc["clean"]
    verdict, reason = _clean(doc, c, "clean", engine, twin, ds.x.to(device), ds.y.to(device), same, out)
    spot = c.get("spot_check")
    if spot:
        drawn = split.subset(int(spot["n"]), seed=int(spot["seed"]), notice=False)
        if drawn.fingerprint != spot["fingerprint"] or len(drawn) != spot["n"]:
            out.append(f"clean.spot_check.fingerprint: the {spot['n']} examples drawn with seed {spot['seed']} "
                       f"have fingerprint {drawn.fingerprint}, the report says {spot['fingerprint']}")
        else:
            v, r = _clean(doc, spot, "clean.spot_check", engine, twin, drawn.x.to(device), drawn.y.to(device), same,
                          out)
            if v != spot["verdict"]:
                out.append(f"clean.spot_check.verdict: report says {spot['verdict']}, measured again {v}: {r}")
            verdict, reason = combine_clean(verdict, reason, v, f"on the report's spot check: {r}")
    if verdict != c["verdict"]:
        out.append(f"clean.verdict: report says {c['verdict']}, measured again {verdict}: {reason}")
    n = max(int(spot["n"]) if spot else 0, AuditConfig.spot_check)  # never fewer than the audit's default: the
    if spot and int(spot["n"]) >= len(split):  # report's n is the report's word
        return  # the report's spot check was the whole split: nothing else to draw
    seed = secrets.randbits(32)
    own = split.subset(n, seed=seed, notice=False)
    with torch.no_grad():
        got = clean_record(twin, engine, own.x.to(device), own.y.to(device), 256, Tolerances(**doc["tolerances"]),
                           runtime=_runtime(doc))
    if got["verdict"] != "match" and c["verdict"] == "match":  # a report that says mismatch already agrees
        out.append(f"clean: on {len(own)} examples verify drew at random from the split (seed {seed}), "
                   f"{got['reason']}")


def _adversarials(doc: Mapping[str, Any], stored: Mapping[str, Mapping[str, np.ndarray]], x: torch.Tensor,
                  y: np.ndarray, out: list[str]) -> None:
    norms = {a["name"]: Norm(a["norm"]) for a in doc["attacks"]}
    for name, arrays in stored.items():
        if name not in norms or not len(arrays["x"]):
            continue
        index = arrays["index"].astype(np.int64)
        if (index < 0).any() or (index >= len(y)).any():
            continue  # reported by the content check
        labels = np.flatnonzero(arrays["y"].astype(np.int64) != y[index])
        if labels.size:
            out.append(f"adversarials {name}: {labels.size} stored label(s) differ from the audited examples' "
                       f"(first at example {int(index[labels[0]])})")
        if norms[name] not in LP_NORMS:
            continue
        adv = torch.from_numpy(np.ascontiguousarray(arrays["x"], dtype=np.float32))
        if tuple(adv.shape[1:]) != tuple(x.shape[1:]):
            out.append(f"adversarials {name}: images of shape {tuple(adv.shape[1:])}, the data's are "
                       f"{tuple(x.shape[1:])}")
            continue
        dist = lp_norm(adv - x[torch.from_numpy(index)], norms[name]).double().numpy()
        eps = arrays["eps"].astype(np.float64)
        off = np.flatnonzero(np.abs(dist - eps) > DISTANCE_TOLERANCE * np.maximum(1.0, eps))
        if off.size:
            j = int(off[0])
            out.append(f"adversarials {name}: {off.size} adversarial(s) lie at another distance from their clean "
                       f"example than their stored eps* (example {int(index[j])}: stored {eps[j]:.6g}, measured "
                       f"{dist[j]:.6g})")


def replay_report(doc: Mapping[str, Any], engine: Any, twin: Any | None, device: torch.device, *,
                  stored: Mapping[str, Mapping[str, np.ndarray]] | None = None, spec: str | None = None
                  ) -> list[str]:
    """Check a report's examples, clean figures, eps* = 0 sets, radii and stored adversarials against the data and
    the models (see the module's docstring); return one line per difference (empty: all agree).

    Parameters
    ----------
    doc : dict
        A validated ``otkit.report/1`` document.
    engine : callable
        The audited engine (:class:`exporters.engines.Engine`), taking (N, C, H, W) pixels in [0, 1].
    twin : nn.Module or None
        The twin, when given; its side is then checked too.
    device : torch.device
    stored : dict, optional
        ``adversarials.npz`` as :func:`evaluators.report.load_adversarials` reads it.
    spec : str, optional
        Where the report's dataset lies on this machine, if not at its recorded spec.

    Raises
    ------
    UserError
        The dataset cannot be read, or it is other data than the report's (fingerprint).
    """
    split = _split(doc, spec)
    ds = audited_examples(doc, spec, split)
    out: list[str] = []
    shape = tuple(ds.input_shape)
    for a in doc["attacks"]:
        bound = largest_radius(Norm(a["norm"]), shape)
        if a["eps_max"] > bound:
            out.append(f"attacks[{a['name']}].eps_max: {a['eps_max']:g} is beyond {bound:.4g}, the largest "
                       f"{a['norm']} distance between two {'x'.join(map(str, shape))} images in [0, 1]")
    y = ds.y.numpy().astype(np.int64)
    _side(doc, "engine", _predictions(engine, ds.x, device), y, out)
    if twin is not None:
        _side(doc, "twin", _predictions(twin, ds.x, device), y, out)
        _clean_checks(doc, engine, twin, ds, split, device, out)
    if stored:
        _adversarials(doc, stored, ds.x, y, out)
    return out


def file_flags(doc: Mapping[str, Any], engine: Any, engine_path: Any, twin: Any | None, twin_info: Any | None
               ) -> list[str]:
    """The flags that follow from the files alone (:func:`evaluators.checks.check_files`: ``precision-not-deployed``,
    and with the twin ``engine-weights-differ`` and ``engine-graph-differs``, its graph compared with the twin's export
    on this machine), raised again: each must be among the report's checks (one line per missing flag), so a report
    edited to drop one fails, signed or not. The other flags need the attacks or the models' outputs, and are taken
    as written."""
    from evaluators.checks import check_files, compare_graph

    have = {c["id"] for c in doc["checks"]}
    graph = compare_graph(engine, engine_path, twin, twin_info)
    return [f"checks: {f.id} is raised again from the files but the report does not have it: {f.message}"
            for f in check_files(engine, engine_path, twin_info, graph) if f.id not in have]


#: With noise drawn on another device, the replay's count of the certificate's class must be within this many standard
#: deviations of the certificate's count (two counts of one binomial; a false alarm about once in two million examples)
COUNT_Z = 5.0


def same_noise(doc: Mapping[str, Any], device: torch.device) -> bool:
    """Whether ``device`` draws a certificate's noise again exactly: its random stream
    (:func:`kit.smoothing.noise_stream`) is the one the certificate records. Certificates written before the record
    existed: the CPU's stream is known; a GPU's is not (its model decides it), nor an unreadable device's, so no."""
    from kit.smoothing import noise_stream

    prov = doc["provenance"]
    recorded = prov.get("noise_stream")
    if recorded is None and str(prov.get("device", "")).split(":")[0] == "cpu":
        recorded = "cpu"
    return recorded is not None and recorded == noise_stream(device)


def replay_certificate(doc: Mapping[str, Any], engine: Any, device: torch.device, *,
                       examples: int | Sequence[int], spec: str | None = None) -> list[str]:
    """Check a certificate (``otkit.certificate/1``) against the data and the engine: its examples drawn again must
    have its fingerprint and labels, and ``examples`` of them (a number: that many drawn at random,
    :func:`random_picks`; or their indices) certified again with the certificate's own seeds. One line per difference.

    Where this device draws the certificate's noise again (:func:`same_noise`), the predictions must be the
    certificate's and the counts equal within ``max(2, n / 1000)`` copies: only the engine's arithmetic (another CPU's
    or GPU's rounding) can move them. Elsewhere (a GPU's certificate checked on the CPU, or on another GPU model) the
    noise is new, and the claim is tested against it: the replay's count of the certificate's class (whatever class
    the replay itself selects) must lie within :data:`COUNT_Z` standard deviations of the certificate's count, plus
    that slack; for an abstention, whose class is not recorded, its count must not exceed the replay's largest class
    count by more than that."""
    from kit.smoothing import certify, example_generator, make_noise

    ds = audited_examples(doc, spec)
    out: list[str] = []
    ex, sm = doc["examples"], doc["smoothing"]
    y = ds.y.numpy().astype(np.int64).tolist()
    if y != list(ex["label"]):
        out.append("examples.label: the labels of the examples drawn again differ from the certificate's")
    noise = make_noise(sm["kind"], sm["sigma"])
    seed = int(doc["provenance"]["seed"])
    n = int(sm["n"])
    slack = max(2, n // 1000)
    exact = same_noise(doc, device)

    @torch.no_grad()
    def labels(batch: torch.Tensor) -> torch.Tensor:
        return engine(batch).argmax(1)

    picks = random_picks(len(ds), examples) if isinstance(examples, int) else [int(j) for j in examples]
    for j in picks:
        if not 0 <= j < len(ds):
            raise UserError(f"example {j} is not among the certificate's {len(ds)} examples")
        c = certify(labels, ds.x[j].to(device), noise, sm["n0"], n, sm["alpha"], sm["noise_batch"],
                    example_generator(seed, j, device), engine.num_classes)
        said, count = int(ex["prediction"][j]), int(ex["count"][j])
        if exact:
            ok, why = c.prediction == said and abs(c.count - count) <= slack, ""
        else:
            ok, why = _within_sampling_error(said, count, c.counts, n, slack)
        if not ok:
            out.append(f"examples[{j}]: certified again as class {c.prediction} with count {c.count} of {n}, "
                       f"the certificate says class {said} with count {count}{why}")
    return out


def _within_sampling_error(said: int, count: int, counts: torch.Tensor, n: int, slack: int) -> tuple[bool, str]:
    """A certificate's (class, count) against the counts of every class under new noise (:func:`replay_certificate`):
    (consistent, what the new noise gave, for the difference line)."""
    if said >= len(counts):
        return False, f"; the engine has {len(counts)} classes"
    again = int(counts[said]) if said >= 0 else int(counts.max())  # an abstention's class is not recorded
    share = (count + again + 1) / (2 * n + 2)
    tol = COUNT_Z * math.sqrt(2 * n * share * (1 - share)) + slack
    ok = count - again <= tol if said < 0 else abs(count - again) <= tol
    what = f"class {said}" if said >= 0 else "its likeliest class"
    return ok, f"; with new noise (drawn on another device) {what} got {again}"
