"""``python -m lepton.healthcheck``: the container health probe (``lepton.ops.healthcheck``) under
the module path that images and manifests name; the same as ``lepton healthcheck``."""

import sys

from lepton.ops.healthcheck import check, main  # noqa: F401  (check re-exported)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
