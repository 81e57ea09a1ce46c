"""``python -m auto_glm.serving``: the ``autoglm serve`` command on its own."""

import sys

from auto_glm.serving.cli import main

sys.exit(main())
