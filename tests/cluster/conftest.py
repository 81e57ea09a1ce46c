"""The Ray Serve tests run in a network namespace that holds only the loopback interface, so
no Ray process can reach, or be reached from, any other machine. ``test_namespace.py``
creates it and runs ``in_namespace/`` there in a child pytest; the outer run never collects
``in_namespace/`` itself."""

from __future__ import annotations

import os

IN_NAMESPACE = os.environ.get("AUTOGLM_TEST_NETNS") == "1"
collect_ignore_glob = [] if IN_NAMESPACE else ["in_namespace/*"]
