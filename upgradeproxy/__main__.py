"""`python -m upgradeproxy` is the CLI."""

from upgradeproxy.cli import main

raise SystemExit(main())
