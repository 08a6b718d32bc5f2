"""Defenses (one module each: a loss and an adversary) and the one training loop that runs them."""

from kit.defenses import madry, standard  # noqa: F401  (registers the defenses)
from kit.defenses.base import Defense, create_defense, list_defenses, register_defense

__all__ = ["Defense", "create_defense", "list_defenses", "register_defense"]
