"""``python -m chameleon_ft.export ...`` is the merge command (see :mod:`chameleon_ft.merge`)."""

from chameleon_ft.merge import main

main()
