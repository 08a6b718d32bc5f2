"""CI systems: GitHub Actions step summaries and annotations, JUnit XML (docs/release.md).

A report or certificate becomes a list of :class:`Case`: one per check a release can fail on.

- **An audit.** The clean agreement, each attack's fidelity verdict, each threat model's worst case, each gate, and
  each validity flag.
- **A certificate.** Each gate and each flag.

A failed case is an ``::error`` annotation and a JUnit ``<failure>``. An error flag waived with ``--allow-flag`` is a
``::warning`` and a skipped test case, with the reason. A warning flag is a ``::warning`` and a passing test case
whose message goes to ``<system-out>``. Info flags are left out.

Workflow-command escaping follows GitHub's rules (actions/toolkit ``command.ts``). In the message, ``%``, CR and LF
become ``%25``, ``%0D`` and ``%0A``. In a property value (``title=``), ``:`` and ``,`` also become ``%3A`` and
``%2C``. The step summary is appended to ``$GITHUB_STEP_SUMMARY``, cut at a line boundary with a note so that the file
stays within GitHub's 1 MiB limit per step.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluators.certificate import is_certificate

__all__ = ["STEP_SUMMARY_LIMIT", "Case", "annotation", "append_step_summary", "cases", "escape_data",
           "escape_property", "junit_xml"]

#: GitHub's limit on one step's summary file, in bytes.
STEP_SUMMARY_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class Case:
    """One check of a release: ``outcome`` is ``passed``, ``failed`` or ``skipped``; ``level`` the annotation it
    gets (``error``, ``warning`` or None)."""

    name: str
    outcome: str
    message: str
    kind: str  # what is checked: clean, fidelity, worst-case, gate, flag
    level: str | None = None


def _flag_cases(doc: dict[str, Any]) -> list[Case]:
    allowed = set(doc.get("allowed_flags", []))
    out = []
    for f in doc["checks"]:
        where = f["attack"] or "model"
        name = f"flag {f['id']} ({where})"
        if f["severity"] == "error" and f["id"] not in allowed:
            out.append(Case(name, "failed", f["message"], "flag", "error"))
        elif f["severity"] == "error":
            out.append(Case(name, "skipped", f"allowed by --allow-flag {f['id']}: {f['message']}", "flag", "warning"))
        elif f["severity"] == "warning":
            out.append(Case(name, "passed", f["message"], "flag", "warning"))
    return out


def cases(doc: dict[str, Any]) -> list[Case]:
    """The cases of an ``otkit.report/1`` or ``otkit.certificate/1`` document (module docstring)."""
    if is_certificate(doc):
        out = [Case(f"gate certified AUAC >= {g['min_certified_auac']:g}", "passed" if g["passed"] else "failed",
                    f"certified AUAC {g['certified_auac']:.4f} (lower bound) against the gate "
                    f"{g['min_certified_auac']:g}", "gate", None if g["passed"] else "error")
               for g in doc["gates"]]
        return out + _flag_cases(doc)
    c = doc["clean"]
    ok = c["verdict"] == "match"
    out = [Case("clean agreement", "passed" if ok else "failed", c.get("reason") or
                f"clean top-1 agreement {c['top1_agreement']:.4f}", "clean", None if ok else "error")]
    for a in doc["attacks"]:
        ok = a["fidelity"]["verdict"] == "match"
        out.append(Case(f"fidelity {a['name']}", "passed" if ok else "failed",
                        f"engine AUAC {a['engine']['auac']:.4f} (upper bound), twin {a['twin']['auac']:.4f}: "
                        f"{a['fidelity']['reason']}", "fidelity", None if ok else "error"))
    for w in doc.get("worst_case", []):
        ok = w.get("fidelity", {}).get("verdict", "match") == "match"
        reason = w.get("fidelity", {}).get("reason", "")
        out.append(Case(f"worst case {w['norm']}", "passed" if ok else "failed",
                        f"engine worst-case AUAC {w['engine']['auac']:.4f} (empirical upper bound) up to eps "
                        f"{w['eps_max']:g}: {reason}", "worst-case", None if ok else "error"))
    for g in doc["gates"]:
        value = g.get("engine_auac_lower", g["engine_auac"])
        what = "lower 95% limit of the engine AUAC" if "engine_auac_lower" in g else "engine AUAC"
        out.append(Case(f"gate {g['attack']} >= {g['min_auac']:g}", "passed" if g["passed"] else "failed",
                        f"{what} {value:.4f} against the gate {g['min_auac']:g}", "gate",
                        None if g["passed"] else "error"))
    return out + _flag_cases(doc)


def escape_data(text: str) -> str:
    """A workflow command's message: ``%``, CR, LF escaped."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A workflow command's property value: as :func:`escape_data`, and ``:`` and ``,`` too."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(level: str, title: str, message: str) -> str:
    """``::error title=...::message`` (or ``warning``), escaped."""
    return f"::{level} title={escape_property(title)}::{escape_data(message)}"


_CUT_NOTE = ("\n\n> **Cut here:** GitHub keeps at most 1 MiB of step summary per step; the whole text is in the "
             "report folder ({where}).\n")


def append_step_summary(path: str | os.PathLike[str], markdown: str, where: str,
                        limit: int = STEP_SUMMARY_LIMIT) -> bool:
    """Append ``markdown`` to the step summary file, cut at a line boundary (with a note naming ``where`` the whole
    text is) so that the file stays within ``limit`` bytes. Returns whether it was cut."""
    p = Path(path)
    used = p.stat().st_size if p.exists() else 0
    data = markdown.encode("utf-8")
    cut = used + len(data) > limit
    if cut:
        note = _CUT_NOTE.format(where=where).encode("utf-8")
        room = max(limit - used - len(note), 0)
        head = data[:room]
        nl = head.rfind(b"\n")
        head = head[: nl + 1] if nl >= 0 else b""
        data = head + note if used + len(head) + len(note) <= limit else b""
    with open(p, "ab") as f:
        f.write(data)
    return cut


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _x(text: Any) -> str:
    """Text XML 1.0 can hold (control characters dropped; ElementTree escapes the rest)."""
    return _NOT_XML.sub("", str(text))


def junit_xml(suites: list[tuple[str, dict[str, Any]]]) -> bytes:
    """JUnit XML (the schema Jenkins and GitLab read): one ``<testsuite>`` per (name, document), one
    ``<testcase>`` per :class:`Case`."""
    root = ET.Element("testsuites", name="otkit")
    totals = {"tests": 0, "failures": 0, "skipped": 0}
    for name, doc in suites:
        cs = cases(doc)
        counts = {"tests": len(cs), "failures": sum(c.outcome == "failed" for c in cs),
                  "skipped": sum(c.outcome == "skipped" for c in cs)}
        seconds = float(doc.get("provenance", {}).get("seconds", 0.0))
        suite = ET.SubElement(root, "testsuite", name=_x(name), errors="0", time=f"{seconds:.3f}",
                              **{k: str(v) for k, v in counts.items()})
        props = ET.SubElement(suite, "properties")
        bound = doc.get("auac_bound") or doc.get("bound") or ""
        for key, value in (("engine", doc["engine"]["path"]), ("engine_sha256", doc["engine"]["sha256"]),
                           ("status", doc["status"]), ("bound", bound)):
            ET.SubElement(props, "property", name=key, value=_x(value))
        for c in cs:
            tc = ET.SubElement(suite, "testcase", classname=f"otkit.{c.kind}", name=_x(c.name), time="0")
            if c.outcome == "failed":
                ET.SubElement(tc, "failure", message=_x(c.message), type=c.kind).text = _x(c.message)
            elif c.outcome == "skipped":
                ET.SubElement(tc, "skipped", message=_x(c.message))
            elif c.message:
                ET.SubElement(tc, "system-out").text = _x(c.message)
        for k in totals:
            totals[k] += counts[k]
    root.set("tests", str(totals["tests"]))
    root.set("failures", str(totals["failures"]))
    root.set("skipped", str(totals["skipped"]))
    root.set("errors", "0")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
