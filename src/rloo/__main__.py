"""``python -m rloo`` = the ``rloo`` command (also what ``accelerate launch -m rloo`` runs)."""

import sys

from rloo.cli import main

if __name__ == "__main__":
    sys.exit(main())
