"""``python -m tallow``: the command line (``tallow.cli``)."""
from .cli import main

raise SystemExit(main())
