"""``python -m viommud`` runs the command-line interface."""

from viommud.shell.cli import main

raise SystemExit(main())
