"""`python -m ekko.cli`: the `ekko` command."""

import sys

from .commands import main

sys.exit(main())
