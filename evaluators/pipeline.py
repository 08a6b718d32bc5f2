"""``otkit run``: train -> export (ONNX fp32/fp16/int8, TensorRT where available) -> audit each artifact -> reports.

A run is described by a TOML file (``docs/run.md``); the embedded default is ``kit/default_run.toml``. Everything
goes to ``<out>/<name>/``::

    run-config.json          the resolved configuration (defaults filled in)
    model.safetensors        the twin (+ .metrics.jsonl, .config.json, .resume.pt)
    export/model*.onnx       the artifacts (+ TensorRT engine and sidecar)
    audit/<format>/          one audit report folder per artifact (report.json, .md, .html, curves.png, ...)
    certify/<format>/        a certificate per artifact of [certify] formats (certificate.json, .md, .html, .png)
    summary.json             one line per artifact: parity, verdict, status, engine AUACs, certified AUAC, reports
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib
import torch

from exporters.formats import ExportFormat
from kit.distributed import World
from kit.errors import UserError
from kit.io import atomic_write, folder_lock
from kit.signing import SigningKey

log = logging.getLogger(__name__)

_ARTIFACT_NAMES = {"onnx": "model.onnx", "onnx-fp16": "model-fp16.onnx", "onnx-int8": "model-int8.onnx",
                   "tensorrt": "model.engine"}


@dataclass
class ExportSection:
    """``[export]``: which artifacts to build and how to check them."""

    formats: list[str] = field(default_factory=lambda: ["onnx", "onnx-fp16", "onnx-int8", "tensorrt"])
    samples: int = 256
    calibration_samples: int = 256
    max_batch: int = 256


@dataclass
class AuditSection:
    """``[audit]``: the options of ``otkit audit`` (gates as a table ``attack = min_auac``)."""

    attacks: list[str] = field(default_factory=lambda: ["pgd-linf@0.3"])
    eps_max: float | None = None
    samples: int = 100
    batch_size: int = 100
    rungs: int = 6
    blackbox_samples: int = 50
    spot_check: int = 1000
    tol_auac: float = 0.01
    tol_curve: float = 0.02
    min_agreement: float = 0.98
    alpha: float = 0.05
    gates: dict[str, float] = field(default_factory=dict)
    allow_flags: list[str] = field(default_factory=list)


@dataclass
class CertifySection:
    """``[certify]``: the options of ``otkit certify`` for the artifacts in ``formats`` (empty: no certificate)."""

    formats: list[str] = field(default_factory=list)
    smoothing: str = "gaussian"
    sigma: float = 0.25
    n0: int = 100
    n: int | None = None
    alpha: float = 0.001
    samples: int = 100
    batch_size: int = 16
    r_max: float | None = None
    min_certified_auac: float | None = None
    attack: bool = True
    attack_n: int = 1000
    allow_flags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    """A whole run: ``name``, ``out`` and the ``[train]``, ``[export]``, ``[audit]``, ``[certify]`` tables."""

    name: str = "demo"
    out: str = "runs"
    train: dict[str, Any] = field(default_factory=dict)
    export: ExportSection = field(default_factory=ExportSection)
    audit: AuditSection = field(default_factory=AuditSection)
    certify: CertifySection = field(default_factory=CertifySection)

    @property
    def folder(self) -> Path:
        return Path(self.out) / self.name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the training table resolved (every TrainConfig field, defaults filled in)."""
        from kit.defenses.trainer import TrainConfig

        return {**dataclasses.asdict(self), "train": TrainConfig.from_dict(dict(self.train)).to_dict()}

    def train_config(self, seed: int = 0, source: str = "[train]") -> Any:
        """The :class:`~kit.defenses.trainer.TrainConfig` of the run (``seed`` unless the table sets one), checked."""
        from kit.defenses.trainer import TrainConfig

        cfg = TrainConfig.from_dict({"seed": seed, **self.train}, source)
        cfg.validate()  # the defense and its parameters included
        return cfg

    def audit_config(self, seed: int = 0) -> Any:
        """The :class:`~evaluators.audit.AuditConfig` of every audit of the run (attacks, radii, gates), checked."""
        from evaluators.audit import AuditConfig, Gate, Tolerances
        from evaluators.evaluate import AttackRequest

        a = self.audit
        if not a.attacks:
            raise UserError("[audit] attacks is empty")
        return AuditConfig(attacks=AttackRequest.parse_all(a.attacks, a.eps_max), batch_size=a.batch_size,
                           rungs=a.rungs, seed=seed, blackbox_samples=a.blackbox_samples, spot_check=a.spot_check,
                           tolerances=Tolerances(auac=a.tol_auac, curve=a.tol_curve, agreement=a.min_agreement,
                                                 alpha=a.alpha),
                           gates=[Gate.parse(f"{k}={v}") for k, v in a.gates.items()],
                           allowed_flags=tuple(a.allow_flags))

    def certify_config(self, device: Any, seed: int = 0) -> Any:
        """The :class:`~evaluators.certify.CertifyConfig` of every certificate of the run, checked."""
        from evaluators.certify import CertifyConfig, default_n

        c = self.certify
        return CertifyConfig(smoothing=c.smoothing, sigma=c.sigma, n=c.n if c.n is not None else default_n(device),
                             n0=c.n0, alpha=c.alpha, batch_size=c.batch_size, seed=seed, r_max=c.r_max,
                             min_certified_auac=c.min_certified_auac, allowed_flags=tuple(c.allow_flags),
                             attack=c.attack, attack_n=c.attack_n)

    def validate(self, source: str = "the run") -> None:
        """Check the whole resolved run before any work: the training options and the defense's parameters, the
        export formats, the attacks and their radii, the gates. Raises :class:`UserError` naming ``source``."""
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise UserError(f"{source}: name must be a plain folder name, got {self.name!r}")
        for fmt in self.export.formats:
            if fmt not in _ARTIFACT_NAMES:
                raise UserError(f"{source}: unknown export format {fmt!r}; known: {', '.join(_ARTIFACT_NAMES)}")
        for fmt in self.certify.formats:
            if fmt not in self.export.formats:
                raise UserError(f"{source}: [certify] formats names {fmt!r}, which [export] formats does not build")
        if self.certify.smoothing not in ("gaussian", "wasserstein"):
            raise UserError(f"{source} [certify]: smoothing must be gaussian or wasserstein, got "
                            f"{self.certify.smoothing!r}")
        for what, check in (("[train]", lambda: self.train_config(0, f"{source} [train]")),
                            ("[audit]", lambda: self.audit_config(0)),
                            ("[certify]", lambda: self.certify_config("cpu", 0))):
            try:
                check()
            except UserError as e:
                msg = str(e)
                raise UserError(msg if msg.startswith(source) else f"{source} {what}: {msg}") from e


def _section(cls: type, table: Any, where: str, source: str) -> Any:
    if not isinstance(table, dict):
        raise UserError(f"{source}: [{where}] must be a table")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise UserError(f"{source}: unknown key(s) in [{where}]: {', '.join(unknown)}; known: {', '.join(names)}")
    obj, defaults = cls(**table), cls()
    for f in dataclasses.fields(cls):  # types as the defaults show them (TOML has no float-vs-int ambiguity issue)
        v, default = getattr(obj, f.name), getattr(defaults, f.name)
        if v is None:
            continue
        if default is None:  # an optional number (eps_max)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UserError(f"{source}: [{where}] {f.name} must be a number, got {v!r}")
            continue
        ok = isinstance(v, type(default)) or (isinstance(default, float) and isinstance(v, int))
        if not ok or isinstance(v, bool) != isinstance(default, bool):
            raise UserError(f"{source}: [{where}] {f.name} must be {type(default).__name__}, got {v!r}")
        if isinstance(default, list) and not all(isinstance(e, str) for e in v):
            raise UserError(f"{source}: [{where}] {f.name} must be a list of names, got {v!r}")
        if isinstance(default, dict) and not all(isinstance(k, str) and isinstance(e, (int, float))
                                                 and not isinstance(e, bool) for k, e in v.items()):
            raise UserError(f"{source}: [{where}] {f.name} must map names to numbers, got {v!r}")
        if isinstance(default, int) and not isinstance(default, bool):
            # black-box samples and the spot check may be 0 (no such check); the other counts are >= 1
            least = 0 if f.name.startswith("blackbox") or f.name == "spot_check" else 1
            if v < least:
                raise UserError(f"{source}: [{where}] {f.name} must be at least {least}, got {v!r}")
    return obj


def parse_run_config(doc: dict[str, Any], source: str = "run.toml") -> RunConfig:
    """A :class:`RunConfig` from a parsed TOML document; unknown keys and wrong types are a :class:`UserError`."""
    from kit.defenses.trainer import TrainConfig

    known = {"name", "out", "train", "export", "audit", "certify"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    name, out = doc.get("name", "demo"), doc.get("out", "runs")
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise UserError(f"{source}: name must be a plain folder name, got {name!r}")
    if not isinstance(out, str):
        raise UserError(f"{source}: out must be a path string, got {out!r}")
    train = doc.get("train", {})
    if not isinstance(train, dict):
        raise UserError(f"{source}: [train] must be a table")
    TrainConfig.from_dict(dict(train), f"{source} [train]")  # names and types first, with the file's wording
    cfg = RunConfig(name=name, out=out, train=dict(train),
                    export=_section(ExportSection, doc.get("export", {}), "export", source),
                    audit=_section(AuditSection, doc.get("audit", {}), "audit", source),
                    certify=_section(CertifySection, doc.get("certify", {}), "certify", source))
    cfg.validate(source)  # the whole run, before any work
    return cfg


def overlay_run_doc(base: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """A run file's document over the embedded default's: what the file sets wins, key by key within each table.

    A sub-table the file sets (``[train.defense_params]``, ``[train.arch_kwargs]``, ``[audit.gates]``) replaces the
    default's whole. Defaults that belong to a choice the file changes are dropped: the default's ``defense_params``
    when the file names another ``defense``, its ``arch_kwargs`` for another ``arch``, its gates when the file lists
    its own ``attacks``. An empty file is the embedded default.
    """
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in doc.items():
        if key in ("train", "export", "audit", "certify") and isinstance(value, dict) and \
                isinstance(merged.get(key), dict):
            table = merged[key]
            if key == "train":
                if "defense" in value and value["defense"] != table.get("defense"):
                    table.pop("defense_params", None)
                if "arch" in value and value["arch"] != table.get("arch"):
                    table.pop("arch_kwargs", None)
            if key == "audit" and "attacks" in value:
                table.pop("gates", None)
            table.update(value)
        else:
            merged[key] = value
    return merged


def default_run_text() -> str:
    """The embedded default run file (``kit/default_run.toml``)."""
    return resources.files("kit").joinpath("default_run.toml").read_text()


def load_run_config(path: str | Path | None) -> RunConfig:
    """Read a run file, laid over the embedded default (:func:`overlay_run_doc`); ``None`` gives the default."""
    default = tomllib.loads(default_run_text())
    if path is None:
        return parse_run_config(default, "the embedded default run")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"run file not found: {p}")
    try:
        doc = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p} is not valid TOML: {e}") from None
    except RecursionError:
        raise UserError(f"{p} is not a run file: tables or arrays nested deeper than Python can read") from None
    return parse_run_config(overlay_run_doc(default, doc), str(p))


def _tensorrt_unavailable(device: torch.device) -> str | None:
    from exporters.tensorrt import require_tensorrt

    try:
        require_tensorrt(device)
    except UserError as e:
        return str(e)
    return None


def run_pipeline(cfg: RunConfig, *, device: torch.device, seed: int = 0, resume: bool = False,
                 command: str = "", versions: dict[str, Any] | None = None,
                 world: World | None = None, sign_key: SigningKey | None = None) -> dict[str, Any] | None:
    """Run the whole job; return the summary (also written to ``summary.json`` in the run folder).

    ``resume`` continues the training from its last epoch and each audit from its last batch. The summary's
    ``status`` is ``fail`` when any audit failed (a gate, or the verdict ``mismatch``). The whole configuration and,
    with ``resume``, the saved states are checked before anything is written; the run folder is locked
    (:func:`kit.io.folder_lock`) while the run works in it.

    Under ``torchrun`` (``world``), the lead process trains and exports while the others wait; then every process
    audits and certifies its own batches of each artifact (:func:`evaluators.audit.run_audit`), and the lead alone
    writes the reports and returns the summary (the others get ``None``).

    ``sign_key`` signs every report and certificate as it is written (:func:`evaluators.attestation.sign_folder`).
    """
    world = world or World()
    cfg.validate()
    audit_cfg = cfg.audit_config(seed)
    train_cfg = cfg.train_config(seed)
    certify_cfg = cfg.certify_config(device, seed)
    if resume:
        from evaluators.audit import check_resumable

        if (cfg.folder / "summary.json").exists():  # written last: nothing was interrupted (and nothing to redo)
            raise UserError(f"nothing to resume in {cfg.folder}: the run is complete (its summary.json is written); "
                            "run it again without --resume to redo it")

        for fmt in cfg.export.formats:  # a changed [audit] is refused now, not after the training and the exports
            check_resumable(cfg.folder / "audit" / fmt, audit_cfg)
    if not world.lead:
        return _run_locked(cfg, audit_cfg, train_cfg, certify_cfg, device=device, seed=seed, resume=resume,
                           command=command, versions=versions, world=world, sign_key=sign_key)
    with folder_lock(cfg.folder, "--name or --out", command=command or None):
        return _run_locked(cfg, audit_cfg, train_cfg, certify_cfg, device=device, seed=seed, resume=resume,
                           command=command, versions=versions, world=world, sign_key=sign_key)


def _run_locked(cfg: RunConfig, audit_cfg: Any, train_cfg: Any, certify_cfg: Any, *, device: torch.device, seed: int,
                resume: bool, command: str, versions: dict[str, Any] | None, world: World,
                sign_key: SigningKey | None = None) -> dict[str, Any] | None:
    """:func:`run_pipeline`'s work, checked and with the run folder locked."""
    from evaluators.attestation import sign_folder
    from evaluators.audit import finish, load_audit_inputs, run_audit
    from evaluators.certificate import write_certificate
    from evaluators.certify import finish as finish_certify
    from evaluators.certify import load_certify_inputs, run_certify
    from evaluators.report import write_report
    from exporters.checkpoint import export_checkpoint
    from kit.arch import is_file_arch
    from kit.defenses.trainer import train

    t0 = time.perf_counter()
    a = cfg.audit
    folder = cfg.folder

    def write_run_config() -> None:  # once the training's own checks passed: a refused --resume writes nothing
        # the previous run's summary goes with its training: summary.json is there only once this run has finished
        # (so --resume can tell an interrupted run from a complete one)
        (folder / "summary.json").unlink(missing_ok=True)
        with atomic_write(folder / "run-config.json", "w") as f:
            json.dump({**cfg.to_dict(), "train": train_cfg.to_dict(), "seed": seed, "device": str(device)}, f,
                      indent=2)

    artifacts: list[tuple[str, Path, Any]] = []  # (format, file, its export record: the lead's alone)
    rows: list[dict[str, Any]] = []
    trained, clean_acc = None, None
    # the run file's [train] arch was named by the user: a file architecture may be imported again to reload the twin
    arch = train_cfg.arch if is_file_arch(train_cfg.arch) else None
    ckpt = folder / "model.safetensors"
    if world.lead:  # the others wait for the model and its artifacts, then share the audits
        # 1. train
        resume_train = resume and ckpt.with_suffix(".resume.pt").exists()
        log.info("[1/4] training %s with %s on %s for %d epochs", train_cfg.arch, train_cfg.defense, train_cfg.data,
                 train_cfg.epochs)
        # a run re-run without --resume replaces its training (the old files stay until the first epoch replaces them)
        trained = train(train_cfg, ckpt, device=device, resume=resume_train, overwrite=not resume_train,
                        on_start=write_run_config,
                        on_epoch=lambda r: log.info("  epoch %d  loss %.4f  held-out acc %.4f", r["epoch"], r["loss"],
                                                    r["test_acc"]))
        clean_acc = trained.final.get("test_acc")

        # 2. export
        (folder / "export").mkdir(exist_ok=True)
        for fmt in cfg.export.formats:
            out = folder / "export" / _ARTIFACT_NAMES[fmt]
            if ExportFormat(fmt) is ExportFormat.TENSORRT:
                why = _tensorrt_unavailable(device)
                if why:
                    log.info("[2/4] %s: skipped (%s)", fmt, why)
                    rows.append({"format": fmt, "status": "skipped", "note": why})
                    continue
            log.info("[2/4] exporting %s", out.name)
            exp = export_checkpoint(ckpt, fmt, out, max_batch=cfg.export.max_batch, samples=cfg.export.samples,
                                    calibration_samples=cfg.export.calibration_samples, device=device, seed=seed,
                                    arch=arch)
            artifacts.append((fmt, exp.path, exp))

    world.barrier()
    if not world.lead:
        for fmt in cfg.export.formats:
            if ExportFormat(fmt) is not ExportFormat.TENSORRT or not _tensorrt_unavailable(device):
                artifacts.append((fmt, folder / "export" / _ARTIFACT_NAMES[fmt], None))

    # 3. audit each artifact
    for fmt, path, exp in artifacts:
        out = folder / "audit" / fmt
        if world.lead:
            out.mkdir(parents=True, exist_ok=True)
        log.info("[3/4] auditing %s against the twin", path.name)
        inputs = load_audit_inputs(path, ckpt, None, "test", a.samples, seed, device, arch=arch)
        # the lead's view of the folder decides (another process may see the state the lead is starting)
        again = world.lead_says(resume and (out / ".audit-state" / "key.json").exists())
        doc, adversarials = run_audit(inputs, audit_cfg, out, resume=again, command=command, versions=versions,
                                      world=world)
        if doc is None:
            continue
        write_report(doc, out, adversarials)
        if sign_key is not None:
            sign_folder(out, sign_key)
        finish(out)
        rows.append({"format": fmt, "status": doc["status"], "verdict": doc["verdict"],
                     # the audit's own clean figures (one agreement everywhere), not the export's parity samples
                     "precision": exp.precision, "top1_agreement": doc["clean"]["top1_agreement"],
                     "max_logit_gap": doc["clean"]["max_logit_gap"],
                     "worst_case_auac": {w["norm"]: w["engine"]["auac"] for w in doc.get("worst_case", [])},
                     "engine_auac": {r["name"]: r["engine"]["auac"] for r in doc["attacks"]},
                     "twin_auac": {r["name"]: r["twin"]["auac"] for r in doc["attacks"]},
                     "flags": len(doc["checks"]), "report": str(out / "report.md"), "artifact": str(exp.path),
                     "sha256": exp.sha256})
    # 4. certify the artifacts [certify] names: a certified lower bound beside the audit's upper bound
    by_format = {r["format"]: r for r in rows}
    for fmt, path, _exp in artifacts:
        if fmt not in cfg.certify.formats:
            continue
        out = folder / "certify" / fmt
        log.info("[4/4] certifying %s (%s smoothing, sigma %g)", path.name, cfg.certify.smoothing,
                 cfg.certify.sigma)
        inputs = load_certify_inputs(path, ckpt, None, "test", cfg.certify.samples, seed, device, arch=arch)
        again = world.lead_says(resume and (out / ".certify-state" / "key.json").exists())
        doc = run_certify(inputs, certify_cfg, out, resume=again, command=command, versions=versions, world=world)
        if doc is None:
            continue
        write_certificate(doc, out)
        if sign_key is not None:
            sign_folder(out, sign_key, "certificate")
        finish_certify(out)
        row = by_format[fmt]
        row["certified_auac"] = doc["certified"]["auac"]
        row["certificate"] = str(out / "certificate.md")
        row["certificate_status"] = doc["status"]
        if doc["status"] != "pass":
            row["status"] = "fail"
    if not world.lead or trained is None:
        return None
    rows.sort(key=lambda r: r["status"] == "skipped")  # audited artifacts first, in format order
    audited = [r for r in rows if r["status"] != "skipped"]
    summary = {
        "run": str(folder),
        "checkpoint": str(ckpt),
        "weights_sha256": trained.info.weights_sha256,
        "defense": train_cfg.defense,
        "clean_accuracy": clean_acc,
        "artifacts": rows,
        "status": "pass" if audited and all(r["status"] == "pass" for r in audited) else "fail",
        "seconds": time.perf_counter() - t0,
    }
    with atomic_write(folder / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary
