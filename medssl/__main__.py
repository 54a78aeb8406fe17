"""``python -m medssl COMMAND …``: the same dispatcher as the ``medssl`` console script."""

import sys

from medssl.cli import medssl_main

if __name__ == "__main__":
    sys.exit(medssl_main())
