"""``python -m robustdrop.sweeps SWEEP_DIR CELL --threads N``: run one cell (:mod:`robustdrop.sweeps.worker`)."""

import sys

from robustdrop.sweeps.worker import main

sys.exit(main())
