"""``python -m peftlab.cli``: the same entry point as the ``peftlab`` command."""

import sys

from peftlab.cli import main

sys.exit(main())
