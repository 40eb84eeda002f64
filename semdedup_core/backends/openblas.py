"""OpenBLAS's `cblas_ssyrk`, called through ctypes: numpy offers no symmetric product (its `A @ A.T`
computes the whole square), and SciPy's `ssyrk` holds the GIL. A ctypes call releases the GIL, so
the compute threads run it side by side. The library is the one numpy itself loaded (found by
threadpoolctl), so its thread count is the one `threads.single_threaded_blas` sets."""

import ctypes
import functools
import itertools
import os

import numpy as np

_ROW_MAJOR, _LOWER, _NO_TRANS = 101, 122, 111  # CBLAS enums


@functools.cache
def ssyrk() -> tuple[str, object] | None:
    """(the library's path, its bound `cblas_ssyrk`) for numpy's OpenBLAS, or None (another
    BLAS, or none found). Builds name their symbols with a prefix and suffix (numpy's wheels:
    `scipy_cblas_ssyrk64_`); the integer width is the build's (USE64BITINT in its config)."""
    from threadpoolctl import threadpool_info

    # numpy's own first (its wheels carry it in numpy.libs): SciPy's may be loaded too.
    site = os.path.dirname(os.path.dirname(np.__file__))
    found = sorted((info["filepath"] for info in threadpool_info()
                    if info.get("internal_api") == "openblas"),
                   key=lambda path: not os.path.relpath(path, site).startswith("numpy"))
    for path in found:
        lib = ctypes.CDLL(path)
        for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_")):
            config = getattr(lib, f"{prefix}openblas_get_config{suffix}", None)
            fn = getattr(lib, f"{prefix}cblas_ssyrk{suffix}", None)
            if config is None or fn is None:
                continue
            config.restype = ctypes.c_char_p
            index = ctypes.c_int64 if b"USE64BITINT" in config() else ctypes.c_int
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, index, index, ctypes.c_float,
                           ctypes.c_void_p, index, ctypes.c_float, ctypes.c_void_p, index]
            return path, fn
    return None


def gram_lower(a: np.ndarray, out: np.ndarray) -> bool:
    """Write a @ a.T's lower triangle, diagonal included, into `out` (n, n), leaving the rest of
    `out` as it was; False (nothing written) where OpenBLAS's ssyrk is not at hand or the arrays
    are not float32 rows with unit column stride. Each element has the bits of numpy's
    `a @ a.T` (the same micro-kernels, the same sums over d: checked by the tests)."""
    found = ssyrk()
    n, k = a.shape
    if (found is None or a.dtype != np.float32 or out.dtype != np.float32 or out.shape != (n, n)
            or a.strides[1] != 4 or out.strides[1] != 4 or not out.flags.writeable):
        return False
    _, fn = found
    fn(_ROW_MAJOR, _LOWER, _NO_TRANS, n, k, 1.0, a.ctypes.data, a.strides[0] // 4, 0.0,
       out.ctypes.data, out.strides[0] // 4)
    return True
