"""The engine benchmarks: our engine against transformers on one seeded workload.

``auto_glm.bench.cli`` holds the command (``autoglm bench``); ``auto_glm.bench.runner`` the
issue-3 measurement on the CPU, ``auto_glm.bench.nano_runner`` nano-vllm's workload on a
GPU (issue 13, ``--workload nano --device cuda``).
"""
