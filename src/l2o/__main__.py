"""``python -m l2o`` (and ``torchrun ... -m l2o``): the ``l2o`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
