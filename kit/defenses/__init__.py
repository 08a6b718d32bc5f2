"""Defenses (one module each: a loss and an adversary) and the one training loop that runs them."""

# Importing a defense module registers it; the order here is the order `otkit train --help` lists them.
from kit.defenses import standard  # noqa: F401  (isort: skip)
from kit.defenses import madry, mixed, trades, atda, sat, got, otc, unbalanced_at, wat  # noqa: F401, I001
from kit.defenses import gaussian, smoothadv  # noqa: F401, I001  (randomised smoothing)
from kit.defenses.base import Defense, create_defense, list_defenses, register_defense

__all__ = ["Defense", "create_defense", "list_defenses", "register_defense"]
