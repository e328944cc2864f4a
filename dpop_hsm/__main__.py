"""``python -m dpop_hsm``: the same as the ``dpop-hsm`` command."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
