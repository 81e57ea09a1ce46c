"""Issue #3's engine benchmark; same as ``autoglm bench``. See ``--help``."""

import sys
from pathlib import Path

# Runs from a source checkout too, where auto_glm is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auto_glm.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
