"""``python -m icm ...``: see :mod:`icm.cli`."""

import sys

from icm.cli import main

sys.exit(main())
