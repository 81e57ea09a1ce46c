"""Native CPU kernels, compiled on first use by ``torch.utils.cpp_extension``: paged decode
attention (over a float, int8 or float8 KV cache), RMSNorm with the residual add,
SiLU-and-multiply, the per-row INT8 quantization and rescaling of w8a8 linear layers, and,
on CPUs with AMX-INT8, a whole w8a8 linear layer in one call.

They are an optimisation only: when no C++ compiler is present, or the build does not finish
within ``BUILD_TIMEOUT_S``, one warning says how to get the kernels and callers use their
plain torch path instead.
"""

from auto_glm.kernels.build import BUILD_TIMEOUT_S, DECODE_HEAD_DIMS, KERNEL_DTYPES, cpu_kernels

__all__ = ["BUILD_TIMEOUT_S", "DECODE_HEAD_DIMS", "KERNEL_DTYPES", "cpu_kernels"]
