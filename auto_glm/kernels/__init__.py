"""Native CPU kernels, compiled on first use by ``torch.utils.cpp_extension``: paged decode
attention, RMSNorm with the residual add, and SiLU-and-multiply.

They are an optimisation only: when no C++ compiler is present the build fails once, a
warning says how to get the kernels, and callers use their plain torch path instead.
"""

from auto_glm.kernels.build import DECODE_HEAD_DIMS, KERNEL_DTYPES, cpu_kernels

__all__ = ["DECODE_HEAD_DIMS", "KERNEL_DTYPES", "cpu_kernels"]
