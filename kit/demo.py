"""The embedded default run: train a small CNN on digits, then score it clean and under L-infinity PGD."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from kit.attacks import PGD
from kit.checkpoint import load_twin
from kit.data import load_dataset
from kit.defenses.trainer import TrainConfig, train

log = logging.getLogger(__name__)

DEMO_EPS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)


def run_demo(out: Path, epochs: int = 5, device: torch.device | str = "cpu", seed: int = 0,
             quiet: bool = False) -> dict[str, Any]:
    """Train ``cnn-small`` on ``digits:16`` (standard training) and measure PGD-20 accuracy at a few epsilons."""
    cfg = TrainConfig(defense="standard", arch="cnn-small", data="digits:16", epochs=epochs, seed=seed)
    ckpt = Path(out) / "model.safetensors"

    def on_epoch(rec: dict[str, Any]) -> None:
        log.info("epoch %d/%d  loss %.4f  held-out acc %.4f", rec["epoch"], epochs, rec["loss"], rec["test_acc"])

    result = train(cfg, ckpt, device=device, on_epoch=None if quiet else on_epoch)
    twin, info = load_twin(ckpt, device=device)
    test = load_dataset(cfg.data, "test", seed=cfg.data_seed)
    x, y = test.x.to(device), test.y.to(device)
    rows = []
    for eps in DEMO_EPS:
        res = PGD(twin, eps=eps, norm="linf", steps=20, seed=seed)(x, y)
        rows.append({"eps": f"{eps:.2f}", "attack": "clean" if eps == 0 else "pgd-linf (20 steps)",
                     "accuracy": f"{res.robust_accuracy:.4f}"})
    return {"checkpoint": str(ckpt), "weights_sha256": info.weights_sha256, "rows": rows,
            "history": result.history}
