"""``python -m viommud`` runs the command-line interface."""

from viommud.cli import main

raise SystemExit(main())
