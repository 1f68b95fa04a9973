"""``python -m autograde``: build the release, autograde submissions, validate or reset a notebook."""

import sys

from autograde.pipeline import main

sys.exit(main())
