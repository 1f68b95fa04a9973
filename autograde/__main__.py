"""``python -m autograde``: build the release, autograde submissions, validate or reset a notebook."""

import sys

from peftlab.course import main

sys.exit(main())
