"""``python -m lepton`` is the same as the ``lepton`` console script."""

import sys

from lepton.ops.cli import main

sys.exit(main())
