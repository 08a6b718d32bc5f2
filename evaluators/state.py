"""Resumable per-batch state of a long evaluation (an audit, a certificate) in a hidden folder of its output folder.

Each finished batch is one ``.npz`` file written atomically; ``key.json`` records everything that changes the numbers
(the configuration, the files' hashes, the data), so a resume with anything changed is refused before any work.
Creating a :class:`BatchState` only checks; :meth:`BatchState.start` is the first write, so a refused resume leaves
the folder, its finished report included, as it was.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kit.errors import UserError
from kit.io import atomic_write

__all__ = ["BatchState", "refuse_changed", "saved_key"]


class BatchState:
    """Per (part, batch) arrays under ``out/dirname``.

    Parameters
    ----------
    out : Path
        The output folder.
    key : dict
        The JSON-able identity of the run's numbers.
    resume : bool
        Continue the state in ``out`` (refused when there is none or its key differs).
    dirname : str
        The state folder's name (``.audit-state``, ``.certify-state``).
    what : str
        What runs, for messages ("audit", "certificate").
    report : str
        The file whose presence means the run is complete (for the "nothing to resume" message).
    remove_report : callable
        Removes the previous report files from ``out`` (called by :meth:`start`).
    """

    def __init__(self, out: Path, key: dict[str, Any], resume: bool, *, dirname: str, what: str, report: str,
                 remove_report: Callable[[Path], Any]) -> None:
        self.out, self.dir, self.key, self.resume = out, out / dirname, key, resume
        self.what, self._remove_report = what, remove_report
        if not resume:
            return
        if not (self.dir / "key.json").exists():
            if (out / report).exists():
                raise UserError(f"nothing to resume in {out}: its {what} is complete ({report}); run without "
                                f"--resume to run it again")
            raise UserError(f"nothing to resume in {out}: no {dirname}/ (run without --resume first)")
        saved = saved_key(self.dir, out, what)
        refuse_changed(out, saved, key, sorted(set(saved) | set(key)), what)

    def start(self) -> None:
        """Begin writing: remove the old report (its main file first: an interrupted run never looks complete) and,
        unless resuming, any old state; record the key."""
        self._remove_report(self.out)
        if self.resume:
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        with atomic_write(self.dir / "key.json", "w") as f:
            json.dump(self.key, f, indent=1)

    def begin(self, world: Any) -> None:
        """:meth:`start` for a run over several processes (:class:`kit.distributed.World`): the lead rank starts,
        the others wait for it, then use its state where they share its filesystem, else start their own (same key,
        the lead's run id); each rank then writes and resumes only its own batches."""
        import uuid

        if world.lead:
            self.start()
            rid = self.dir / "run-id"
            if not self.resume or not rid.exists():
                with atomic_write(rid, "w") as f:
                    f.write(uuid.uuid4().hex)
            token = rid.read_text()
        world.barrier()
        token = world.gather_text(token if world.lead else "")[0]
        if world.lead:
            return
        rid = self.dir / "run-id"
        if rid.exists() and rid.read_text() == token:
            return  # the lead's folder (a shared filesystem), or this node's own from the same run
        if self.resume:
            raise UserError(f"cannot resume the {self.what} in {self.out} on this node: its state is not the lead "
                            "rank's run (give every node the same shared --out, or run without --resume)")
        shutil.rmtree(self.dir, ignore_errors=True)  # another run's batches on this node's own filesystem
        self.dir.mkdir(parents=True)
        with atomic_write(self.dir / "key.json", "w") as f:
            json.dump(self.key, f, indent=1)
        with atomic_write(rid, "w") as f:
            f.write(token)

    def path(self, part: str, batch: int) -> Path:
        return self.dir / f"{part}.{batch:06d}.npz"

    def load(self, part: str, batch: int) -> dict[str, np.ndarray] | None:
        p = self.path(part, batch)
        if not p.exists():
            return None
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save(self, part: str, batch: int, arrays: dict[str, np.ndarray]) -> None:
        with atomic_write(self.path(part, batch)) as f:
            np.savez(f, **arrays)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def saved_key(state_dir: Path, out: Path, what: str) -> dict[str, Any]:
    """The key record of the state in ``state_dir`` (which exists)."""
    meta = state_dir / "key.json"
    try:
        saved = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot resume the {what} in {out}: {meta} is unreadable ({e})") from e
    if not isinstance(saved, dict):
        raise UserError(f"cannot resume the {what} in {out}: {meta} is not a key record")
    return saved


def refuse_changed(out: Path, saved: dict[str, Any], key: dict[str, Any], fields: list[str], what: str) -> None:
    """A :class:`UserError` naming the ``fields`` whose values differ between ``saved`` and ``key``."""
    differ = [k for k in fields if saved.get(k) != key.get(k)]
    if differ:
        raise UserError(f"cannot resume the {what} in {out}: {', '.join(differ)} changed since it started")
