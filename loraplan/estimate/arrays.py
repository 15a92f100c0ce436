"""Scalar-or-array helpers: the estimator's formulas run on ints or on numpy arrays alike.

``loraplan estimate`` passes plain ints (one case) and never imports numpy; ``loraplan sweep``
passes numpy arrays of one shape (a whole grid at once). numpy is imported only when an array
is given.
"""

from __future__ import annotations

import math

#: CUDA caching allocator rounds every block to a multiple of 512 bytes
#: (c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize = 512, round_size).
BLOCK = 512


def is_scalar(x) -> bool:
    return isinstance(x, (int, float))


def ceil(x):
    if is_scalar(x):
        return math.ceil(x)
    import numpy as np

    return np.ceil(x)


def maximum(a, b):
    if is_scalar(a) and is_scalar(b):
        return a if a >= b else b
    import numpy as np

    return np.maximum(a, b)


def minimum(a, b):
    if is_scalar(a) and is_scalar(b):
        return min(a, b)
    import numpy as np

    return np.minimum(a, b)


def where(cond, a, b):
    if is_scalar(cond) or isinstance(cond, bool):
        return a if cond else b
    import numpy as np

    return np.where(cond, a, b)


def blocks(nbytes):
    """Bytes as the allocator counts them: rounded up to 512-byte blocks (0 stays 0)."""
    n = ceil(nbytes / BLOCK) * BLOCK
    return where(nbytes > 0, maximum(n, BLOCK), 0)
