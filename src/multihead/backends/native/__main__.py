"""``python -m multihead.backends.native``: build the kernel and say whether it is available."""

import sys

from . import main

sys.exit(main())
