"""``python -m chameleon_ft.export ...`` is the merge command (see :mod:`chameleon_ft.export.merge`)."""

import sys

from chameleon_ft.export.merge import main

sys.exit(main())
