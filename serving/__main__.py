"""``python -m serving --bundle DIR``: see :mod:`serving.server`."""

import sys

from serving.server import main

sys.exit(main())
