"""``python -m chameleon_ft.generate key=value ...``: text answers / captions or text-to-image.

See :class:`chameleon_ft.generation.config.GenerateConfig` for the keys and
:mod:`chameleon_ft.generation.generate` for what is written.
"""

import sys

from chameleon_ft.generation.generate import main

if __name__ == "__main__":
    sys.exit(main())
