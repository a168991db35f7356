"""``python -m bench.report``: see :mod:`bench.report.build`."""

import sys

from bench.report.build import main

sys.exit(main())
