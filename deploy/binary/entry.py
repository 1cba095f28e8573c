"""The frozen binary's entry point: the same `main` as the `upgradeproxy` console script."""

from upgradeproxy.cli import main

raise SystemExit(main())
