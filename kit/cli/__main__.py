"""``python -m kit.cli`` runs the ``otkit`` command line (as ``python -m kit`` does)."""

from kit.cli import main

if __name__ == "__main__":
    main()
