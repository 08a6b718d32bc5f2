"""Where releases live: Hugging Face model-index metadata and a model-card section (docs/release.md).

:func:`model_index` turns an audit report (and any certificates of the same engine) into the ``model-index`` block of
a Hugging Face model card's YAML front matter: task ``image-classification``, one result per dataset and split, and
per result the engine's clean accuracy, one worst-case AUAC per threat model (an *empirical upper bound*: attacks)
and one certified AUAC per certificate (a *certified lower bound* at confidence 1 - alpha). Each metric's ``name``
says which bound it is and its ``args`` carry the radius, the attacks or the smoothing, the interval and the number
of examples. The field names are those of Hugging Face's model card specification (``huggingface_hub``'s
``EvalResult``); :func:`check_with_huggingface_hub` round-trips the block through that package where it is
installed (``pip install otkit[hf]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from evaluators.render import NORM_LABEL, certificate_rows, md_table, md_text
from kit.io import path_name

__all__ = ["MODEL_INDEX_FIELDS", "check_with_huggingface_hub", "model_card", "model_index", "model_index_yaml"]

#: The documented fields of a model-index result (Hugging Face's model card specification, ``EvalResult``): the
#: output uses no other key.
MODEL_INDEX_FIELDS = {
    "result": {"task", "dataset", "metrics", "source"},
    "task": {"type", "name"},
    "dataset": {"type", "name", "config", "split", "revision", "args"},
    "metric": {"type", "value", "name", "config", "args", "verified", "verifyToken"},
    "source": {"name", "url"},
}
#: The metric types written: clean accuracy, the attacks' worst case, the certificate.
METRIC_TYPES = {"clean": "accuracy", "attack": "robust-auac", "certified": "certified-auac"}


def _round(v: float) -> float:
    return round(float(v), 4)


def _dataset(data: dict[str, Any]) -> dict[str, Any]:
    """The dataset entry: the kit's dataset kind as type, the spec as name unless its argument is a local path (a
    model card should not carry a path of the machine that audited)."""
    kind, _, arg = data["spec"].partition(":")
    name = data["spec"] if arg and "/" not in arg and "\\" not in arg else kind
    return {"type": kind, "name": name, "split": data["split"],
            "args": {"fingerprint": data["fingerprint"], "examples": data["n"], "seed": data["seed"]}}


def _audit_metrics(doc: dict[str, Any]) -> list[dict[str, Any]]:
    n = doc["data"]["n"]
    out = [{"type": METRIC_TYPES["clean"], "value": _round(doc["clean"]["engine_accuracy"]),
            "name": f"Clean accuracy (engine, {n} examples)", "verified": False}]
    worst = doc.get("worst_case") or [
        # a report without the worst case per threat model: each attack's engine curve
        {"norm": a["norm"], "eps_max": a["eps_max"], "attacks": [a["name"]], "engine": a["engine"]}
        for a in doc["attacks"]]
    for w in worst:
        label = NORM_LABEL.get(w["norm"], w["norm"])
        out.append({
            "type": METRIC_TYPES["attack"], "value": _round(w["engine"]["auac"]),
            "name": f"Worst-case {label} AUAC up to eps {w['eps_max']:g} (empirical upper bound from attacks)",
            "args": {"bound": "upper", "threat_model": w["norm"], "eps_max": w["eps_max"],
                     "attacks": list(w["attacks"]), "auac_ci95": [_round(v) for v in w["engine"]["auac_ci"]],
                     "examples": n},
            "verified": False})
    return out


def _certificate_metrics(cert: dict[str, Any]) -> list[dict[str, Any]]:
    sm, c = cert["smoothing"], cert["certified"]
    label = NORM_LABEL.get(sm["norm"], sm["norm"])
    return [{"type": METRIC_TYPES["certified"], "value": _round(c["auac"]),
             "name": (f"Certified {label} AUAC up to radius {c['r_max']:.4g} (lower bound, each radius with "
                      f"probability >= {1 - sm['alpha']:g})"),
             "args": {"bound": "lower", "threat_model": sm["norm"], "r_max": c["r_max"], "smoothing": sm["kind"],
                      "sigma": sm["sigma"], "alpha": sm["alpha"], "noise_samples": sm["n"],
                      "smoothed_accuracy": _round(c["smoothed_accuracy"]), "examples": cert["data"]["n"]},
             "verified": False}]


def model_index(report: dict[str, Any] | None, certificates: Sequence[dict[str, Any]] = (), *,
                name: str | None = None, source_url: str | None = None) -> list[dict[str, Any]]:
    """The ``model-index`` list (one model) for an audit report and certificates of the same engine.

    Parameters
    ----------
    report : dict or None
        An ``otkit.report/1`` document (None: certificates only).
    certificates : sequence of dict
        ``otkit.certificate/1`` documents.
    name : str, optional
        The model's name (default: the engine file's name without its suffix).
    source_url : str, optional
        Where the report is published (the release page); ``source`` is written only with it.

    Returns
    -------
    list
        ``[{"name": ..., "results": [...]}]``, one result per (dataset, split) in the order first seen.
    """
    docs = ([report] if report is not None else []) + list(certificates)
    if not docs:
        raise ValueError("model_index needs a report or a certificate")
    name = name or os.path.splitext(path_name(docs[0]["engine"]["path"]))[0]
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for doc in docs:
        key = (doc["data"]["spec"], doc["data"]["split"])
        if key not in results:
            results[key] = {"task": {"type": "image-classification", "name": "Image Classification"},
                            "dataset": _dataset(doc["data"]), "metrics": []}
            if source_url:
                results[key]["source"] = {"name": "otkit", "url": source_url}
        metrics = _audit_metrics(doc) if doc is report else _certificate_metrics(doc)
        results[key]["metrics"] += metrics
    return [{"name": name, "results": list(results.values())}]


def model_index_yaml(index: list[dict[str, Any]]) -> str:
    """The front-matter block: ``---``, ``model-index:`` as YAML, ``---`` (PyYAML's safe dumper: every string
    quoted as YAML needs)."""
    import yaml

    body = yaml.safe_dump({"model-index": index}, sort_keys=False, allow_unicode=True, default_flow_style=False,
                          width=1000)
    return f"---\n{body}---\n"


def check_with_huggingface_hub(index: list[dict[str, Any]]) -> str | None:
    """Parse ``index`` with ``huggingface_hub`` (``model_index_to_eval_results``) where it is installed and compare
    every metric; returns what differs (None when it agrees, or when the package is absent)."""
    try:
        from huggingface_hub.repocard_data import model_index_to_eval_results
    except ImportError:
        return None
    model_name, results = model_index_to_eval_results(index)
    flat = [(r, m) for r in index[0]["results"] for m in r["metrics"]]
    if model_name != index[0]["name"] or len(results) != len(flat):
        return f"huggingface_hub read {len(results)} result(s) for {model_name!r}, expected {len(flat)}"
    for ev, (r, m) in zip(results, flat):
        if (ev.task_type, ev.dataset_type, ev.dataset_split, ev.metric_type, ev.metric_value, ev.metric_name) != (
                r["task"]["type"], r["dataset"]["type"], r["dataset"]["split"], m["type"], m["value"], m["name"]):
            return f"huggingface_hub read metric {m['name']!r} differently"
    return None


def _link(path: str) -> str:
    """A relative path as a Markdown link destination: percent-encoded (spaces, parentheses, ``#``, ``?``, ``%``,
    ``<``, ``>``, ``&``, backslashes), ``/`` kept."""
    from urllib.parse import quote

    return quote(path, safe="/")


def model_card(report: dict[str, Any] | None, certificates: Sequence[dict[str, Any]] = (), *,
               name: str | None = None, source_url: str | None = None, curves: str | None = "curves.png",
               certified: Sequence[str | None] | None = None) -> str:
    """A model-card section (GitHub-flavoured Markdown, for a Hugging Face README): the robustness table, the plots,
    what the numbers bound, and how to verify the report.

    ``curves`` is the link to the audit's ``curves.png`` and ``certified`` one link per certificate to its
    ``certified.png`` (default: the bare file names, for plots uploaded beside the README); ``None`` leaves a plot
    out (e.g. its file is missing)."""
    index = model_index(report, certificates, name=name, source_url=source_url)
    first = report if report is not None else certificates[0]
    e, d = first["engine"], first["data"]
    out = ["## Robustness", ""]
    out.append(md_text(
        f"Measured with otkit on {d['n']} examples of the {d['split']} split of {index[0]['results'][0]['dataset']['name']}"
        f" (data fingerprint {d['fingerprint'][:19]}...), on the deployed engine {path_name(e['path'])} "
        f"({e['format']}, {e['precision']}, {e['sha256'][:19]}...)."))
    out.append("")
    rows = []
    for r in index[0]["results"]:
        for m in r["metrics"]:
            a = m.get("args", {})
            bound = {"upper": "upper bound (attacks)", "lower": "lower bound (certified)"}.get(a.get("bound"), "-")
            radius = a.get("eps_max", a.get("r_max"))
            ci = a.get("auac_ci95")
            rows.append({"metric": m["name"].split(" (")[0], "threat model": NORM_LABEL.get(a.get("threat_model"), "-")
                         if a.get("threat_model") else "-",
                         "radius": f"{radius:.4g}" if radius is not None else "-", "value": f"{m['value']:.4f}",
                         "95% CI": f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-", "bound": bound,
                         "examples": str(a.get("examples", d["n"]))})
    out += md_table(rows, free=("metric",))
    out.append("")
    out.append(md_text(
        "A worst-case AUAC (Area Under the Accuracy Curve, accuracy averaged over radii 0 to the largest) comes from "
        "attacks: an empirical upper bound on robustness, which a stronger attack can only lower. A certified AUAC "
        "comes from randomized smoothing of the engine: a lower bound, each radius holding with the stated "
        "probability."))
    links = list(certified) if certified is not None else ["certified.png"] * len(certificates)
    if len(links) != len(certificates):
        raise ValueError(f"{len(certificates)} certificates but {len(links)} plot links")
    if report is not None and curves is not None:
        out += ["", f"![accuracy against epsilon, engine and twin]({_link(curves)})"]
    for cert, link in zip(certificates, links):
        if link is not None:
            out += ["", f"![certified accuracy against radius]({_link(link)})"]
        out += [""] + md_table(certificate_rows(cert), free=())
    if report is not None:
        out += ["", md_text(f"Audit verdict: {report['verdict']}, status {report['status']}.")]
    out += ["", "The report can be checked against the released files with `otkit verify REPORT_DIR --engine ENGINE "
            "--twin TWIN` (add `--public-key PUB` when it is signed)."]
    if source_url:
        out += ["", f"Full report: <{source_url}>"]
    return "\n".join(out) + "\n"
