"""Issue #3's engine benchmark: our engine against transformers on one seeded workload.

``auto_glm.bench.cli`` holds the command, ``auto_glm.bench.runner`` the measurement.
"""
