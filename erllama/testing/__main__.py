"""``python -m erllama.testing [tiny|smollm2|gemma3|all]``: install the test models into the model cache."""

from __future__ import annotations

import sys

from erllama.testing.fetch import GEMMA3, SMOLLM2, FetchError, fetch
from erllama.testing.tiny import tiny_model


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "all"
    if what not in ("tiny", "smollm2", "gemma3", "all"):
        print("usage: python -m erllama.testing [tiny|smollm2|gemma3|all]", file=sys.stderr)
        return 2
    try:
        if what in ("tiny", "all"):
            print(tiny_model())
        if what in ("smollm2", "all"):
            print(fetch(SMOLLM2))
        if what in ("gemma3", "all"):
            print(fetch(GEMMA3))
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
