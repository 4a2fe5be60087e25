#!/usr/bin/env python3
"""Submit a vilbert command as a multi-node SLURM job: `python launch/slurm.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout runs without being installed

from vilbert.launch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
