"""``python -m kvloom``: the command line (see ``kvloom.cli``)."""

from kvloom.cli import main

raise SystemExit(main())
