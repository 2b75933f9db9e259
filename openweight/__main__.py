"""``python -m openweight``: the same as the ``openweight`` command."""

import sys

from openweight.cli import main

sys.exit(main())
