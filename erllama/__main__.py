"""``python -m erllama``: the command line (``erllama.cli``)."""

from __future__ import annotations

import sys

from erllama.cli import main

if __name__ == "__main__":
    sys.exit(main())
