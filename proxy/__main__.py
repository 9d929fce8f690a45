"""`python -m proxy` is the same as the `wsgate` command."""

from proxy.cli import main

raise SystemExit(main())
