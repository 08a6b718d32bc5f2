"""Render an audit report (``otkit.report/1``) and a certificate (``otkit.certificate/1``) for people: release notes in
Markdown, one self-contained HTML page, and the accuracy plot (PNG).

Every renderer takes the validated document (:func:`evaluators.report.load_report`) and returns text or bytes; writing
them is :mod:`evaluators.report`'s job. Text that came from the document (names, paths, messages) is escaped for its
format. Matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from typing import Any

from kit.io import path_name

__all__ = ["NORM_LABEL", "certificate_rows", "md_table", "md_text", "plot_certificate_png", "plot_png",
           "render_certificate_html", "render_certificate_markdown", "render_html", "render_markdown",
           "verification_rows", "verification_text", "worst_rows"]

NORM_LABEL = {"linf": "L-inf", "l2": "L2", "wasserstein": "Wasserstein"}


# ------------------------------------------------------------------------------------------------------ formatting
def _num(v: float, spec: str = ".4f") -> str:
    return format(v, spec)


def _ci(ci: list[float], spec: str = ".4f") -> str:
    return f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def worst_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    """One row per threat model: its worst case over every attack run (the report's headline)."""
    return [{"threat model": w["norm"], "eps_max": _num(w["eps_max"], ".4g"),
             "engine worst-case AUAC (upper bound) [95% CI]":
                 f"{_num(w['engine']['auac'])} {_ci(w['engine']['auac_ci'])}",
             "twin worst-case AUAC [95% CI]": f"{_num(w['twin']['auac'])} {_ci(w['twin']['auac_ci'])}",
             "engine-only adversarials at eps_max (differential / twin-guided)":
                 f"{w['engine_only']['count'][-1]} / {w['engine_only']['twin_guided_count'][-1]}"
                 if w.get("engine_only") else "-",
             "black box: engine fooled below the twin": str(blackbox_engine_only(w)) if w.get("blackbox") else "-",
             "verdict": w.get("fidelity", {}).get("verdict", "-"),
             "attacks": ", ".join(w["attacks"])} for w in doc.get("worst_case", [])]


def blackbox_engine_only(worst: dict[str, Any]) -> int:
    """On how many examples the black box fooled the engine at a smaller radius than the twin (``blackbox.eps``
    below ``blackbox.twin_eps``, or the twin never fooled; reports written before ``twin_eps`` count every black-box
    adversarial)."""
    bb = worst["blackbox"]
    twin = bb.get("twin_eps") or [None] * len(bb["eps"])
    return sum(e is not None and (t is None or e < t) for e, t in zip(bb["eps"], twin))


def _attack_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for a in doc["attacks"]:
        f = a["fidelity"]
        rows.append({
            "attack": a["name"],
            "norm": a["norm"],
            "eps_max": _num(a["eps_max"], ".4g"),
            "twin AUAC [95% CI]": f"{_num(a['twin']['auac'])} {_ci(a['twin']['auac_ci'])}",
            "engine AUAC [95% CI]": f"{_num(a['engine']['auac'])} {_ci(a['engine']['auac_ci'])}",
            "AUAC gap [95% CI]": f"{_num(f['auac_gap'], '+.4f')} {_ci(f['auac_gap_ci'], '+.4f')}",
            "max curve gap": f"{_num(f['max_gap'])} at eps {_num(f['max_gap_eps'], '.4g')}",
            "verdict": f["verdict"],
        })
    return rows


def _gate_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    return [{"attack": g["attack"], "min AUAC": _num(g["min_auac"]),
             "engine AUAC (upper bound)": _num(g["engine_auac"]),
             "compared: lower 95% limit": _num(g["engine_auac_lower"]) if "engine_auac_lower" in g else "-",
             "result": "pass" if g["passed"] else "FAIL"} for g in doc["gates"]]


#: what every AUAC of an audit is (docs/audit.md): said wherever one is shown
UPPER_BOUND = ("Every AUAC here comes from attacks: an empirical upper bound on robustness (a stronger attack can only "
               "lower it), not a certificate.")


def _title(doc: dict[str, Any]) -> str:
    return f"Audit report: verdict {doc['verdict']}, status {doc['status']}"


def failure_reasons(doc: dict[str, Any]) -> list[str]:
    """Why an audit failed, most basic first: the clean comparison, each attack's fidelity, each gate, each error
    flag not allowed (empty for a pass)."""
    out = []
    c = doc["clean"]
    if c["verdict"] == "mismatch":
        out.append(c.get("reason") or f"clean top-1 agreement {c['top1_agreement']:.4f} is below "
                                      f"{doc['tolerances']['agreement']:g}")
    artefacts = {f["attack"] for f in doc["checks"]
                 if f["id"] == "engine-above-twin" and f["message"].startswith("search artefact")}
    out += [f"{a['name']}: {a['fidelity']['reason']}"
            + (" (its search stopped short on the engine, a search artefact: see the engine-above-twin flag; drop "
               "the attack or give it more steps)" if a["name"] in artefacts else "")
            for a in doc["attacks"] if a["fidelity"]["verdict"] == "mismatch"]
    out += [f"worst case {w['norm']} (every attack, the black box and the engine-only attack): "
            f"{w['fidelity']['reason']}" for w in doc.get("worst_case", [])
            if w.get("fidelity", {}).get("verdict") == "mismatch"]
    for g in doc["gates"]:
        if not g["passed"]:
            value = g.get("engine_auac_lower", g["engine_auac"])
            what = "lower 95% limit of the engine AUAC" if "engine_auac_lower" in g else "engine AUAC"
            out.append(f"gate {g['attack']}: {what} {value:.4f} < {g['min_auac']:g}")
    allowed = doc.get("allowed_flags", [])
    out += [f"error flag {f['id']} ({f['attack'] or 'model'})" for f in doc["checks"]
            if f["severity"] == "error" and f["id"] not in allowed]
    return out


def _summary(doc: dict[str, Any]) -> str:
    reasons = failure_reasons(doc) if doc["status"] == "fail" else []
    head = f"The audit fails: {'; '.join(reasons)}. " if reasons else ""
    e, t, d, tol = doc["engine"], doc["twin"], doc["data"], doc["tolerances"]
    providers = f", {', '.join(e['providers'])}" if e["providers"] else ""
    k = len(doc["attacks"])
    matched = sum(a["fidelity"]["verdict"] == "match" for a in doc["attacks"])
    gates = doc["gates"]
    passed = sum(g["passed"] for g in gates)
    gate_text = f"{passed} of {len(gates)} AUAC gate(s) passed." if gates else "No AUAC gate was set."
    waived = [c["id"] for c in doc["checks"] if c["severity"] == "error" and c["id"] in doc.get("allowed_flags", [])]
    if waived:  # a pass that needed a waiver says so up front
        head += f"Error flag(s) waived with --allow-flag: {', '.join(dict.fromkeys(waived))}. "
    return (f"{head}The engine {path_name(e['path'])} ({e['format']}, {e['precision']}{providers}) was audited "
            f"against its "
            f"PyTorch twin {path_name(t['path'])} ({t['arch']}) on {d['n']} examples of the {d['split']} split of "
            f"{d['spec']} (seed {d['seed']}). {_graph_line(e)}{k} attack(s) driven by the twin's gradients were "
            f"evaluated on both models: {matched} of {k} accuracy curve(s) match within tolerance (AUAC gap at most "
            f"{tol['auac']:g}; "
            f"curve gaps above {tol['curve']:g} count where McNemar p is below {tol['alpha']:g}). "
            + "".join(f"Worst case over every {w['norm']} attack: engine AUAC {_num(w['engine']['auac'])} at "
                      f"eps_max {_num(w['eps_max'], '.4g')}. " for w in doc.get("worst_case", []))
            + f"{gate_text} {UPPER_BOUND}")


def _graph_line(engine: dict[str, Any]) -> str:
    g = engine.get("graph")
    return f"The engine's graph against the twin's export: {g['status']} ({g['reason']}). " if g else ""


def _clean_line(doc: dict[str, Any]) -> str:
    c = doc["clean"]
    return (f"twin accuracy {_num(c['twin_accuracy'])}, engine accuracy {_num(c['engine_accuracy'])}, top-1 agreement "
            f"{_num(c['top1_agreement'])} (at least {doc['tolerances']['agreement']:g} required), max logit gap "
            f"{'not finite' if c['max_logit_gap'] is None else _num(c['max_logit_gap'], '.3g')}"
            + (f" (tolerance {_num(c['max_logit_gap_tolerance'], '.3g')})"
               if c.get("max_logit_gap_tolerance") is not None else "")
            + f": {c['verdict']}" + _spot_text(c))


def _spot_text(c: dict[str, Any]) -> str:
    """The clean spot check's clause (examples drawn at random from the split), or nothing."""
    s = c.get("spot_check")
    if not s:
        return ""
    gap = "not finite" if s["max_logit_gap"] is None else _num(s["max_logit_gap"], ".3g")
    return (f"; spot check on {s['n']} examples drawn at random from the split: top-1 agreement "
            f"{_num(s['top1_agreement'])}, max logit gap {gap}: {s['verdict']}")


def _reasons(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(a["name"], a["fidelity"]["reason"]) for a in doc["attacks"] if a["fidelity"]["reason"].strip()]


def _convention_text(d: dict[str, Any]) -> str:
    from kit.convention import InputConvention

    try:
        return str(InputConvention.from_dict(d, "report"))
    except Exception:  # a report is anyone's text; render what it says  # noqa: BLE001
        return str(d)


def _provenance_rows(doc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(label, value, is_code) rows of the provenance section."""
    e, t, d, p = doc["engine"], doc["twin"], doc["data"], doc["provenance"]
    versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items()
                         if v is not None and not isinstance(v, (dict, list)))
    rows = [
        ("engine file", e["path"], False),
        ("engine sha256", e["sha256"], True),
        ("twin checkpoint", t["path"], False),
        ("twin sha256", t["sha256"], True),
        ("twin weights sha256", t["weights_sha256"], True),
    ]
    conv = e.get("input_convention")
    if conv and _convention_text(conv) != "identity":
        rows.append(("engine input", _convention_text(conv) + " (applied outside the engine)", True))
    if t.get("input_convention"):
        rows.append(("twin input", _convention_text(t["input_convention"]) + " (folded into the twin)", True))
    src = t.get("source")
    if src:
        rows.append(("twin imported from", f"{src.get('file')} ({src.get('kind')}, {src.get('sha256')})", False))
        if src.get("parity"):
            par = src["parity"]
            rows.append(("twin vs ONNX Runtime", f"max logit gap {_num(par['max_abs_diff'], '.3g')}, top-1 agreement "
                         f"{_num(par['top1_agreement'])} on {par['samples']} samples of {par['samples_from']}: "
                         f"{par['verdict']}", False))
    rows += [
        ("data", f"{d['spec']} ({d['split']}), n = {d['n']}, seed {d['seed']}", False),
        ("data fingerprint", d["fingerprint"], True),
        ("otkit", p["kit_version"], False),
    ]
    if versions:
        rows.append(("versions", versions, False))
    rows += [("device", p["device"], False), ("started", f"{p['started']} ({p['seconds']:.1f} s)", False)]
    if p["command"]:
        rows.append(("command", p["command"], True))
    adv = doc["artifacts"]["adversarials"]
    rows.append(("adversarials", adv or "not stored", False))
    if "adversarials_sha256" in doc["artifacts"]:
        rows.append(("adversarials sha256", doc["artifacts"]["adversarials_sha256"], True))
    return rows


# -------------------------------------------------------------------------------------------------------- markdown
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#~&!])")


def md_text(text: Any) -> str:
    """Text safe anywhere in GitHub-flavoured Markdown (table cells too): one line, punctuation backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _md_code(text: str) -> str:
    """An inline code span (a fence longer than any backtick run inside); for table cells use :func:`md_text`."""
    text = " ".join(text.split())
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_table(rows: list[dict[str, str]], free: tuple[str, ...] = ("attack",)) -> list[str]:
    """A GFM table; the ``free`` columns hold text from the document and are escaped, the others are the kit's own
    formatting (numbers, enums) and only have ``|`` escaped."""

    def cell(col: str, value: str) -> str:
        return md_text(value) if col in free else " ".join(value.split()).replace("|", "\\|")

    cols = list(rows[0])
    lines = ["| " + " | ".join(cell("", c) for c in cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in cols) + " |" for r in rows]
    return lines


def render_markdown(doc: dict[str, Any]) -> str:
    """The report as release notes: GitHub-flavoured Markdown, no HTML.

    Sections: a title with the verdict and status, a one-paragraph summary, the attack table (twin and engine AUAC
    with their bootstrap intervals, the AUAC gap engine - twin, the largest accuracy gap and where), the clean-input
    agreement, the AUAC gates, the validity checks, and the provenance (hashes, data fingerprint, versions). Every
    string from the document is escaped (``|`` in cells, HTML-looking text, emphasis markers).

    Parameters
    ----------
    doc : dict
        A valid ``otkit.report/1`` document (see :func:`validate_report`).

    Returns
    -------
    str
        The Markdown text, ending with a newline.
    """
    mark = "\u2705" if doc["status"] == "pass" else "\u274c"
    out = [f"# {mark} {_title(doc)}", "", md_text(_summary(doc)), ""]
    if doc.get("worst_case"):
        out += ["## Worst case per threat model", "", *md_table(worst_rows(doc)), ""]
    out += ["## Attacks", ""]
    out += md_table(_attack_rows(doc))
    reasons = _reasons(doc)
    if reasons:
        out += [""] + [f"- **{md_text(name)}**: {md_text(reason)}" for name, reason in reasons]
    out += ["", f"**Clean inputs:** {_clean_line(doc)}", "", "## Gates", ""]
    gates = _gate_rows(doc)
    out += md_table(gates) if gates else ["No AUAC gate was set."]
    out += ["", "## Checks", ""]
    if doc["checks"]:
        out += [f"- **{md_text(c['severity'])}**{flag_effect(doc, c)} {_md_code(c['id'])} "
                f"({md_text(c['attack'] or 'model')}): {md_text(c['message'])}" for c in doc["checks"]]
    else:
        out.append("No check raised a flag.")
    if doc.get("verification"):
        out += ["", "## Formal verification", "", md_text(verification_text(doc["verification"])), ""]
        out += md_table(verification_rows(doc["verification"]), free=())
    out += ["", "## Provenance", ""]
    out += [f"- {label}: {_md_code(value) if code else md_text(value)}" for label, value, code in _provenance_rows(doc)]
    return "\n".join(out) + "\n"


def verification_text(v: dict[str, Any]) -> str:
    """What a report's ``verification`` section is, in one paragraph."""
    who = v["verifier"] or "a formal verifier"
    what = ("the audited engine" if v["is_audited_engine"]
            else f"an fp32 ONNX file of the same model ({v['source_sha256'][:19]}...), not the audited engine")
    return (f"{who} checked L-inf balls the attacks called robust, on {what}. An unsat answer is a proof that no "
            "input in the ball changes the prediction: the verified accuracy is a lower bound, with no confidence "
            "level; the attacks' accuracy at the same radius is an upper bound. A sat answer is an adversarial the "
            "attacks missed.")


def verification_rows(v: dict[str, Any]) -> list[dict[str, str]]:
    """One row per radius of a report's ``verification`` section."""
    return [{"radius": _num(r["radius"], ".4g"), "properties": str(r["properties"]), "unsat (proved)": str(r["unsat"]),
             "sat (adversarial)": str(r["sat"]), "unknown": str(r["unknown"]),
             "verified accuracy (lower bound)": _num(r["verified_accuracy"]),
             "attack accuracy (upper bound)": _num(r["attack_accuracy"])} for r in v["radii"]]


# ------------------------------------------------------------------------------------------------------------ plot
def _mpl_text(text: str) -> str:
    return str(text).replace("$", r"\$")  # no mathtext from user strings


def plot_png(doc: dict[str, Any], dpi: int = 110) -> bytes:
    """curves.png as bytes: one panel per attack, twin (solid) and engine (dashed) accuracy on the shared grid.

    The legend gives each curve's AUAC; the panel title gives the attack's fidelity verdict (red when mismatch).
    Drawn with matplotlib's Agg canvas directly (no pyplot state, no backend switch).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    attacks = doc["attacks"]
    cols = min(3, len(attacks))
    rows = math.ceil(len(attacks) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows + 0.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, a in zip(axes.flat, attacks):
        grid = a["eps_grid"]
        ax.plot(grid, a["twin"]["accuracy"], "-", color="tab:blue",
                label=f"twin (AUAC {a['twin']['auac']:.3f}, upper bound)")
        ax.plot(grid, a["engine"]["accuracy"], "--", color="tab:orange",
                label=f"engine (AUAC {a['engine']['auac']:.3f}, upper bound)")
        verdict = a["fidelity"]["verdict"]
        ax.set_title(_mpl_text(f"{a['name']}: {verdict}"), fontsize=10,
                     color="tab:red" if verdict == "mismatch" else "black")
        ax.set_xlabel(f"epsilon ({NORM_LABEL.get(a['norm'], a['norm'])})")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(attacks):]:
        ax.set_visible(False)
    fig.suptitle(_mpl_text(f"{path_name(doc['engine']['path'])} vs twin: {doc['verdict']}, {doc['status']}"))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------------ html
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1f2328;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #d0d7de;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f6f8fa}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.85em;word-break:break-all}
.badge{display:inline-block;border-radius:1em;padding:.05em .7em;font-size:.75em;color:#fff;vertical-align:middle}
.pass,.match{background:#1a7f37}.fail,.mismatch{background:#cf222e}
.sev{font-weight:600}.sev-error{color:#cf222e}.sev-warning{color:#9a6700}.sev-info{color:#0969da}
td.mismatch,td.FAIL{color:#cf222e;background:none;font-weight:600}td.match,td.pass{background:none}
img{max-width:100%;height:auto;border:1px solid #d0d7de}
"""


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def flag_effect(doc: dict[str, Any], check: dict[str, Any]) -> str:
    """What an error flag did to the audit: `` (fails the audit)`` or `` (allowed by --allow-flag)``; else ``""``."""
    if check["severity"] != "error":
        return ""
    return " (allowed by --allow-flag)" if check["id"] in doc.get("allowed_flags", []) else " (fails the audit)"


def _html_table(rows: list[dict[str, str]], status_col: str) -> list[str]:
    cols = list(rows[0])
    out = ["<table>", "<tr>" + "".join(f"<th>{_h(c)}</th>" for c in cols) + "</tr>"]
    for r in rows:
        cells = []
        for c in cols:
            cls = f' class="{_h(r[c])}"' if c == status_col and r[c] in ("match", "mismatch", "pass", "FAIL") else ""
            cells.append(f"<td{cls}>{_h(r[c])}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return out


def render_html(doc: dict[str, Any], png_bytes: bytes | None) -> str:
    """The report as ONE self-contained HTML page, with the same content as :func:`render_markdown`.

    Inline CSS, the plot embedded as a ``data:image/png;base64`` URI, no scripts, no external resources; every string
    from the document is HTML-escaped.

    Parameters
    ----------
    doc : dict
        A valid ``otkit.report/1`` document.
    png_bytes : bytes or None
        curves.png (:func:`plot_png`); ``None`` leaves the plot out.

    Returns
    -------
    str
        The page.
    """
    status, verdict = doc["status"], doc["verdict"]
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_h(_title(doc))}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f'<h1>Audit report <span class="badge {_h(verdict)}">verdict: {_h(verdict)}</span> '
           f'<span class="badge {_h(status)}">status: {_h(status)}</span></h1>',
           f"<p>{_h(_summary(doc))}</p>"]
    if png_bytes:
        uri = "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")
        out.append(f'<p><img alt="twin and engine accuracy curves per attack" src="{uri}"></p>')
    if doc.get("worst_case"):
        out += ["<h2>Worst case per threat model</h2>", *_html_table(worst_rows(doc), "verdict")]
    out += ["<h2>Attacks</h2>", *_html_table(_attack_rows(doc), "verdict")]
    reasons = _reasons(doc)
    if reasons:
        out += ["<ul>", *(f"<li><strong>{_h(n)}</strong>: {_h(r)}</li>" for n, r in reasons), "</ul>"]
    out += [f"<p><strong>Clean inputs:</strong> {_h(_clean_line(doc))}</p>", "<h2>Gates</h2>"]
    gates = _gate_rows(doc)
    out += _html_table(gates, "result") if gates else ["<p>No AUAC gate was set.</p>"]
    out.append("<h2>Checks</h2>")
    return "\n".join(out + _html_checks_and_provenance(doc, _provenance_rows(doc))) + "\n"


def _html_checks_and_provenance(doc: dict[str, Any], provenance: list[tuple[str, str, bool]]) -> list[str]:
    """The end of a page: the flags (or that none was raised), the provenance table, the closing tags."""
    out = []
    if doc["checks"]:
        out.append("<ul>")
        out += [f'<li><span class="sev sev-{_h(c["severity"])}">{_h(c["severity"])}</span>{_h(flag_effect(doc, c))} '
                f'<code>{_h(c["id"])}</code> ({_h(c["attack"] or "model")}): {_h(c["message"])}</li>'
                for c in doc["checks"]]
        out.append("</ul>")
    else:
        out.append("<p>No check raised a flag.</p>")
    if doc.get("verification"):
        out += ["<h2>Formal verification</h2>", f"<p>{_h(verification_text(doc['verification']))}</p>",
                *_html_table(verification_rows(doc["verification"]), "")]
    out += ["<h2>Provenance</h2>", "<table>"]
    for label, value, code in provenance:
        cell = f"<code>{_h(value)}</code>" if code else _h(value)
        out.append(f"<tr><th>{_h(label)}</th><td>{cell}</td></tr>")
    return out + ["</table>", "</body>", "</html>"]


# ----------------------------------------------------------------------------------------------------- certificates
_SMOOTHING_LABEL = {"gaussian": "Gaussian noise (L2 radii; Cohen, Rosenfeld & Kolter 2019)",
                    "wasserstein": "Laplace noise on pixel flows (Wasserstein radii, the kit's unit-mass units; "
                                   "Levine & Feizi 2020)"}


def _certificate_title(doc: dict[str, Any]) -> str:
    return f"Certificate of {path_name(doc['engine']['path'])}: {doc['status']}"


def _certificate_summary(doc: dict[str, Any]) -> str:
    sm, c, d, e = doc["smoothing"], doc["certified"], doc["data"], doc["engine"]
    conf = 1 - sm["alpha"]
    fails = [f"certified AUAC {g['certified_auac']:.4f} < {g['min_certified_auac']:g}"
             for g in doc["gates"] if not g["passed"]]
    fails += [f"error flag {f['id']}" for f in doc["checks"]
              if f["severity"] == "error" and f["id"] not in doc.get("allowed_flags", [])]
    head = f"The certificate fails: {'; '.join(fails)}. " if fails else ""
    text = (f"{head}The engine {path_name(e['path'])} ({e['format']}, {e['precision']}) was smoothed with "
            f"{_SMOOTHING_LABEL.get(sm['kind'], sm['kind'])} at sigma {sm['sigma']:g} and certified on {d['n']} "
            f"examples of the {d['split']} split of {d['spec']} (seed {d['seed']}) with n0 {sm['n0']} and n "
            f"{sm['n']} noise samples each. Certified AUAC {c['auac']:.4f} up to radius {c['r_max']:.4g}; the smoothed "
            f"engine classifies {c['smoothed_accuracy']:.4f} of the examples correctly and abstains on "
            f"{c['abstain_rate']:.4f}. These are certified lower bounds: each radius holds with probability at least "
            f"{conf:g} over the noise sampling. With n {sm['n']} samples no radius above {sm['max_radius']:.4g} can be "
            "certified.")
    a = doc.get("attack")
    if a:
        text += (f" The attack {a['name']} on the smoothed engine gives AUAC {a['auac']:.4f} over the same radii: an "
                 "empirical upper bound from attacks. The engine's smoothed robustness lies between the two.")
    return text


def certificate_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    """The certified curve at five radii (0, r_max/4, ..., r_max), beside the attack curve when there is one."""
    c = doc["certified"]
    grid, acc = c["radius_grid"], c["accuracy"]
    a = doc.get("attack")
    picks = sorted({round(i * (len(grid) - 1) / 4) for i in range(5)})
    rows = []
    for i in picks:
        row = {"radius": f"{grid[i]:.4g}", "certified accuracy (lower bound)": f"{acc[i]:.4f}"}
        if a:
            row["attack accuracy (upper bound)"] = f"{a['accuracy'][i]:.4f}"
        rows.append(row)
    return rows


def render_certificate_markdown(doc: dict[str, Any]) -> str:
    """A certificate as GitHub-flavoured Markdown: the summary, the certified curve at five radii (beside the attack
    curve when there is one), checks and provenance."""
    mark = "\u2705" if doc["status"] == "pass" else "\u274c"
    out = [f"# {mark} {md_text(_certificate_title(doc))}", "", md_text(_certificate_summary(doc)), "",
           "## Certified accuracy", "", *md_table(certificate_rows(doc), free=()), ""]
    out += ["## Gates", ""]
    out += [f"- certified AUAC {g['certified_auac']:.4f} >= {g['min_certified_auac']:g}: "
            f"{'passed' if g['passed'] else 'FAILED'}" for g in doc["gates"]] or ["No gate was set."]
    out += ["", "## Checks", ""]
    out += [f"- **{md_text(c['severity'])}**{flag_effect(doc, c)} {_md_code(c['id'])} ({md_text(c['attack'] or 'model')}): "
            f"{md_text(c['message'])}" for c in doc["checks"]] or ["No check raised a flag."]
    out += ["", "## Provenance", ""]
    out += [f"- {label}: {_md_code(value) if code else md_text(value)}" for label, value, code in _cert_provenance(doc)]
    return "\n".join(out) + "\n"


def _cert_provenance(doc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    e, d, p = doc["engine"], doc["data"], doc["provenance"]
    rows = [("engine", e["path"], True), ("engine sha256", e["sha256"], True),
            ("data fingerprint", d["fingerprint"], True)]
    if doc.get("twin"):
        rows += [("twin", doc["twin"]["path"], True), ("twin sha256", doc["twin"]["sha256"], True)]
    rows += [("smoothing", ", ".join(f"{k} {v}" for k, v in doc["smoothing"].items()), False),
             ("kit", str(p["kit_version"]), False), ("command", p["command"] or "-", True),
             ("started", p["started"], False), ("seconds", f"{p['seconds']:.1f}", False)]
    return rows


def render_certificate_html(doc: dict[str, Any], png_bytes: bytes | None) -> str:
    """A certificate as one self-contained HTML page (inline CSS, the plot as a data URI, nothing fetched)."""
    status = doc["status"]
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{_h(_certificate_title(doc))}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f'<h1>Certificate <span class="badge {_h(status)}">status: {_h(status)}</span></h1>',
           f"<p>{_h(_certificate_summary(doc))}</p>"]
    if png_bytes:
        uri = "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")
        out.append(f'<p><img alt="certified accuracy (lower bound) and attack accuracy (upper bound)" src="{uri}"></p>')
    out += ["<h2>Certified accuracy</h2>", *_html_table(certificate_rows(doc), "")]
    out.append("<h2>Checks</h2>")
    return "\n".join(out + _html_checks_and_provenance(doc, _cert_provenance(doc))) + "\n"


def plot_certificate_png(doc: dict[str, Any], dpi: int = 110) -> bytes:
    """certified.png: the certified accuracy (lower bound, solid) and, when the smoothed engine was attacked, the
    attack's accuracy (upper bound, dashed) over the same radii: the sandwich."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = doc["certified"]
    fig = Figure(figsize=(5.6, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    # acc(r_k) bounds the accuracy on (r_{k-1}, r_k] from below (it only falls with r): drawn to the left of r_k
    ax.plot(c["radius_grid"], c["accuracy"], "-", drawstyle="steps-pre", color="tab:green",
            label=f"certified (AUAC {c['auac']:.3f}, lower bound, {1 - doc['smoothing']['alpha']:g} conf.)")
    a = doc.get("attack")
    if a:
        ax.plot(a["eps_grid"], a["accuracy"], "--", drawstyle="steps-post", color="tab:red",
                label=f"{_mpl_text(a['name'])} (AUAC {a['auac']:.3f}, empirical upper bound)")
    norm = doc["smoothing"]["norm"]
    ax.set_xlabel(f"radius ({NORM_LABEL.get(norm, norm)})")
    ax.set_ylabel("accuracy of the smoothed engine")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_mpl_text(f"{path_name(doc['engine']['path'])}, {doc['smoothing']['kind']} sigma "
                           f"{doc['smoothing']['sigma']:g}"), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
