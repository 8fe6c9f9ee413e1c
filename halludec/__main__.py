"""``python -m halludec`` = the ``halludec`` command."""

from halludec.cli import main

raise SystemExit(main())
