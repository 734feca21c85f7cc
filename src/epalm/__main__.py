"""``python -m epalm ...``: the command line (same as the ``epalm`` script)."""

from epalm.interface.cli import main

raise SystemExit(main())
