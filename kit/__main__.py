"""``python -m kit`` runs the ``otkit`` command line."""

from kit.cli import main

if __name__ == "__main__":
    main()
