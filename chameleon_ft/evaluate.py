"""``python -m chameleon_ft.evaluate [--adapter DIR] [--split NAME] [--output FILE] recipe=NAME [overrides]``.

See :mod:`chameleon_ft.evaluation.evaluate`.
"""

import sys

from chameleon_ft.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
