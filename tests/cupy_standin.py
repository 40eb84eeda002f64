"""Host stand-ins for CuPy and cuML, strict enough that the GPU backend's code runs in CI the way
it would on a device.

`HostCuPy` offers only the CuPy functions the engine calls, each with the parameters it has in
both CuPy 13 and CuPy 14 (read from their sources: `cupy/_sorting`, `_math`, `_creation`,
`_indexing`, `_manipulation`, `_statistics`, `_core/core.pyx`), so a function or keyword that one
of them lacks fails here. Like CuPy:
- its arrays (`DeviceArray`) refuse implicit conversion to numpy (`np.asarray`, numpy functions
  and ufuncs), and its functions and arithmetic refuse host arrays, 0-d ones too (numpy scalars
  and Python numbers are fine; indexing and item assignment accept host arrays, as CuPy's do);
- `asarray` and `asnumpy` copy (host and device never share memory);
- sorts are stable; `argsort` takes `kind` only as None or "stable", and the array method
  `argsort` takes no `kind` (CuPy 13).
`StandInKMeans` takes cuML 26.10's KMeans keywords and refuses what cuML/cuVS refuse: `tol <= 0`, a
seed outside [0, 2**32), initial centres of the wrong shape; it also insists on `n_init=1` with
an initial array (more runs from one array only repeat the work).
"""

import numbers
import sys
from types import ModuleType, SimpleNamespace

import numpy as np


class HostArrayError(TypeError):
    pass


def _plain(x, where: str):
    """The numpy array under a DeviceArray; scalars pass; a host array is refused."""
    if isinstance(x, DeviceArray):
        return x._a
    if isinstance(x, np.ndarray):
        raise HostArrayError(f"{where}: a host (numpy) array of shape {x.shape} given where CuPy "
                             "needs a device array (copy it with asarray first)")
    if isinstance(x, (numbers.Number, np.generic)) or x is None:
        return x
    raise TypeError(f"{where}: unsupported type {type(x).__name__}")


def _index(key):
    """An index for numpy: device arrays unwrapped; host arrays allowed (CuPy copies them)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    return key._a if isinstance(key, DeviceArray) else key


def _dev(a):
    """A numpy result as device memory (scalars become 0-d arrays, as CuPy returns them)."""
    if isinstance(a, tuple):
        return tuple(_dev(x) for x in a)
    if isinstance(a, np.generic):
        a = np.asarray(a)
    return DeviceArray(a)


def _op(fn, name):
    def method(self, other):
        return _dev(fn(self._a, _plain(other, name)))

    def reflected(self, other):
        return _dev(fn(_plain(other, name), self._a))

    def inplace(self, other):
        fn(self._a, _plain(other, name), out=self._a)
        return self

    return method, reflected, inplace


class DeviceArray:
    """An array in (stand-in) device memory: numpy underneath, reachable only through HostCuPy's
    functions, its own methods and arithmetic with other device arrays or scalars."""

    __array_ufunc__ = None  # numpy ufuncs refuse it; `host + device` comes here and is refused

    def __init__(self, a: np.ndarray):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __repr__(self):
        return f"DeviceArray({self._a!r})"

    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    T = property(lambda self: DeviceArray(self._a.T))

    def __getattr__(self, name):
        raise AttributeError(f"cupy.ndarray.{name} is not in the stand-in: check that CuPy 13 and "
                             "14 both have it, then add it to tests/cupy_standin.py")

    def __len__(self):
        if self._a.ndim == 0:
            raise TypeError("len() of unsized object")
        return len(self._a)

    def __bool__(self):
        return bool(self._a)

    def __int__(self):
        return int(self._a)

    def __float__(self):
        return float(self._a)

    def __getitem__(self, key):
        return _dev(self._a[_index(key)])  # basic slices stay views, as on CuPy

    def __setitem__(self, key, value):
        value = value._a if isinstance(value, DeviceArray) else value  # CuPy copies host values
        self._a[_index(key)] = value

    __add__, __radd__, __iadd__ = _op(np.add, "+")
    __sub__, __rsub__, __isub__ = _op(np.subtract, "-")
    __mul__, __rmul__, __imul__ = _op(np.multiply, "*")
    __truediv__, __rtruediv__, __itruediv__ = _op(np.true_divide, "/")
    __matmul__, __rmatmul__, _ = _op(np.matmul, "@")
    __and__, __rand__, __iand__ = _op(np.bitwise_and, "&")
    __or__, __ror__, __ior__ = _op(np.bitwise_or, "|")
    __lt__ = _op(np.less, "<")[0]
    __le__ = _op(np.less_equal, "<=")[0]
    __gt__ = _op(np.greater, ">")[0]
    __ge__ = _op(np.greater_equal, ">=")[0]
    __eq__ = _op(np.equal, "==")[0]
    __ne__ = _op(np.not_equal, "!=")[0]
    __hash__ = None

    def __neg__(self):
        return DeviceArray(-self._a)

    def __invert__(self):
        return DeviceArray(~self._a)

    # Methods, with the parameters CuPy 13 and 14 both have.
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return DeviceArray(self._a.astype(dtype, order=order, copy=copy))

    def copy(self, order="C"):
        return DeviceArray(self._a.copy(order=order))

    def sum(self, axis=None, dtype=None, out=None, keepdims=False):
        return _dev(self._a.sum(axis=axis, dtype=dtype, out=_plain(out, "sum"), keepdims=keepdims))

    def max(self, axis=None, out=None, keepdims=False):
        return _dev(self._a.max(axis=axis, out=_plain(out, "max"), keepdims=keepdims))

    def min(self, axis=None, out=None, keepdims=False):
        return _dev(self._a.min(axis=axis, out=_plain(out, "min"), keepdims=keepdims))

    def argmax(self, axis=None, out=None, dtype=None, keepdims=False):
        return _dev(self._a.argmax(axis=axis, out=_plain(out, "argmax"), keepdims=keepdims))

    def argmin(self, axis=None, out=None, dtype=None, keepdims=False):
        return _dev(self._a.argmin(axis=axis, out=_plain(out, "argmin"), keepdims=keepdims))

    def cumsum(self, axis=None, dtype=None, out=None):
        return _dev(self._a.cumsum(axis=axis, dtype=dtype, out=_plain(out, "cumsum")))

    def argsort(self, axis=-1):  # CuPy 13's method takes no `kind`
        return DeviceArray(self._a.argsort(axis=axis, kind="stable"))

    def reshape(self, *shape, order="C"):
        return DeviceArray(self._a.reshape(*shape, order=order))

    def ravel(self, order="C"):
        return DeviceArray(self._a.ravel(order=order))

    def get(self, stream=None, order="C", out=None, blocking=True):
        return np.array(self._a, order=order)

    def item(self):
        return self._a.item()

    def tolist(self):
        return self._a.tolist()


class _Generator:
    """`cupy.random.default_rng(seed)`: only `standard_normal`, with CuPy's parameters."""

    def __init__(self, seed=None):
        self._rng = np.random.default_rng(seed)

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        if out is not None:
            raise NotImplementedError("the stand-in's standard_normal takes no out")
        return DeviceArray(np.asarray(self._rng.standard_normal(size, dtype=dtype)))


class _MemoryPool:
    def __init__(self, free: int):
        self._free = free

    def free_bytes(self) -> int:
        return self._free


class HostCuPy(ModuleType):
    """The part of CuPy the engine uses, over numpy, for a device of a chosen size. Install it as
    `sys.modules["cupy"]` (`installed`) and the shipped GpuBackend and probe run on it."""

    float16, float32, float64 = np.float16, np.float32, np.float64
    int32, int64, bool_ = np.int32, np.int64, np.bool_
    inf, nan = np.inf, np.nan
    ndarray = DeviceArray
    __version__ = "14.2.0-host-stand-in"

    def __init__(self, free: int = 64 << 30, total: int = 80 << 30, pool_free: int = 0,
                 devices: int = 1, broken: str | None = None):
        super().__init__("cupy")
        self._broken = broken  # "kernel" or "matmul": what a CUDA install without NVRTC/cuBLAS fails
        runtime = SimpleNamespace(
            memGetInfo=lambda: (free, total), getDeviceCount=lambda: devices,
            getDeviceProperties=lambda i: {"name": b"host stand-in", "totalGlobalMem": total},
            deviceSynchronize=lambda: None)
        self.cuda = SimpleNamespace(runtime=runtime, Device=lambda device=None: SimpleNamespace(id=0))
        self._pool = _MemoryPool(pool_free)
        self.random = SimpleNamespace(default_rng=_Generator)

    def show_config(self, *, _full=False):
        print(f"CuPy Version          : {self.__version__}\nCUDA Root             : none (host stand-in)")

    def __getattr__(self, name):
        raise AttributeError(f"cupy.{name} is not in the stand-in: check that CuPy 13 and 14 both "
                             "have it, with the keywords the engine passes, then add it to "
                             "tests/cupy_standin.py")

    def get_default_memory_pool(self):
        return self._pool

    def _fails(self, what: str):
        if self._broken == what:
            raise RuntimeError(f"stand-in for a CUDA install whose {what} fails "
                               "(e.g. libnvrtc.so or libcublas.so not found)")

    # -- creation and transfers
    def asarray(self, a, dtype=None, order=None, *, blocking=False):
        if isinstance(a, DeviceArray):
            return a if dtype is None or a.dtype == dtype else a.astype(dtype)
        return DeviceArray(np.array(a, dtype=dtype, order=order or "K", copy=True))  # host -> device

    def asnumpy(self, a, stream=None, order="C", out=None, *, blocking=True):
        if isinstance(a, DeviceArray):
            return np.array(a._a, order=order, copy=True)  # device -> host
        return np.asarray(a, order=order)

    def ascontiguousarray(self, a, dtype=None):
        return DeviceArray(np.ascontiguousarray(_plain(a, "ascontiguousarray"), dtype=dtype))

    def empty(self, shape, dtype=float, order="C"):
        return DeviceArray(np.empty(shape, dtype=dtype, order=order))

    def zeros(self, shape, dtype=float, order="C"):
        return DeviceArray(np.zeros(shape, dtype=dtype, order=order))

    def full(self, shape, fill_value, dtype=None, order="C"):
        return DeviceArray(np.full(shape, _plain(fill_value, "full"), dtype=dtype, order=order))

    def arange(self, start, stop=None, step=1, dtype=None):
        self._fails("kernel")
        return DeviceArray(np.arange(start, stop, step, dtype=dtype)
                           if stop is not None else np.arange(start, step=step, dtype=dtype))

    # -- ufuncs (host arrays refused, 0-d included)
    def maximum(self, x1, x2, out=None, *, dtype=None):
        return self._ufunc(np.maximum, "maximum", x1, x2, out, dtype)

    def minimum(self, x1, x2, out=None, *, dtype=None):
        return self._ufunc(np.minimum, "minimum", x1, x2, out, dtype)

    def multiply(self, x1, x2, out=None, *, dtype=None):
        return self._ufunc(np.multiply, "multiply", x1, x2, out, dtype)

    def sqrt(self, x, out=None, *, dtype=None):
        a = _plain(x, "sqrt")
        if out is None:
            return _dev(np.sqrt(a, dtype=dtype))
        np.sqrt(a, out=_plain(out, "sqrt"), dtype=dtype)
        return out

    def matmul(self, x1, x2, out=None, *, dtype=None):
        self._fails("matmul")
        return self._ufunc(np.matmul, "matmul", x1, x2, out, dtype)

    def _ufunc(self, fn, name, x1, x2, out, dtype):
        a, b = _plain(x1, name), _plain(x2, name)
        if out is None:
            return _dev(fn(a, b, dtype=dtype))
        fn(a, b, out=_plain(out, name), dtype=dtype)
        return out

    # -- the rest of what the kernels call
    def where(self, condition, x=None, y=None):
        if x is None or y is None:
            raise NotImplementedError("the stand-in's where takes condition, x and y")
        return _dev(np.where(_plain(condition, "where").astype(bool), _plain(x, "where"),
                             _plain(y, "where")))

    def clip(self, a, a_min, a_max, out=None):
        return _dev(np.clip(_plain(a, "clip"), _plain(a_min, "clip"), _plain(a_max, "clip"),
                            out=_plain(out, "clip")))

    def cumsum(self, a, axis=None, dtype=None, out=None):
        return _dev(np.cumsum(_plain(a, "cumsum"), axis=axis, dtype=dtype, out=_plain(out, "cumsum")))

    def searchsorted(self, a, v, side="left", sorter=None):
        if not isinstance(a, DeviceArray):
            raise NotImplementedError("Only int or ndarray are supported for a")
        if not isinstance(v, DeviceArray) and not isinstance(v, (int, float, complex)):
            raise NotImplementedError("Only python scalars or ndarrays are supported for v")
        return _dev(np.searchsorted(a._a, _plain(v, "searchsorted"), side=side,
                                    sorter=_plain(sorter, "searchsorted")))

    def bincount(self, x, weights=None, minlength=None):
        return _dev(np.bincount(_plain(x, "bincount"), _plain(weights, "bincount"),
                                minlength=minlength or 0))

    def flatnonzero(self, a):
        return _dev(np.flatnonzero(_plain(a, "flatnonzero")))

    def argsort(self, a, axis=-1, kind=None):
        if kind not in (None, "stable"):
            raise ValueError("kind can only be None or 'stable'")
        return _dev(np.argsort(_plain(a, "argsort"), axis=axis, kind="stable"))

    def take_along_axis(self, a, indices, axis):
        return _dev(np.take_along_axis(_plain(a, "take_along_axis"),
                                       _plain(indices, "take_along_axis"), axis))

    def concatenate(self, tup, axis=0, out=None, *, dtype=None, casting="same_kind"):
        return _dev(np.concatenate([_plain(x, "concatenate") for x in tup], axis=axis,
                                   out=_plain(out, "concatenate"), dtype=dtype, casting=casting))


def installed(monkeypatch, cupy: HostCuPy | None = None, cuml: bool = False) -> HostCuPy:
    """Make `import cupy` (and with `cuml`, `from cuml.cluster import KMeans`) find the stand-ins
    for the rest of the test."""
    cupy = cupy or HostCuPy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    if cuml:
        pkg, cluster = ModuleType("cuml"), ModuleType("cuml.cluster")
        cluster.KMeans = StandInKMeans
        pkg.cluster = cluster
        monkeypatch.setitem(sys.modules, "cuml", pkg)
        monkeypatch.setitem(sys.modules, "cuml.cluster", cluster)
    else:
        monkeypatch.setitem(sys.modules, "cuml", None)  # `import cuml` raises ImportError
    return cupy


class StandInKMeans:
    """cuML 26.10's `cuml.cluster.KMeans` as far as the GPU backend uses it: keyword-only
    parameters, cuML's and cuVS's refusals, and a plain Lloyd fit from the given centres that,
    like cuML, keeps an emptied cluster's old centre and stops on a relative inertia change."""

    def __init__(self, *, n_clusters=8, max_iter=300, tol=1e-4, verbose=False, random_state=None,
                 init="scalable-k-means++", n_init="auto", oversampling_factor=2.0,
                 max_samples_per_batch=1 << 15, device_buffer_samples=0, init_size=0,
                 output_type=None):
        self.n_clusters, self.max_iter, self.tol = n_clusters, max_iter, tol
        self.random_state, self.init, self.n_init = random_state, init, n_init
        self.output_type = output_type

    def fit(self, X):
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0 (cuVS), got {self.tol}")
        seed = self.random_state
        if not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
            raise ValueError(f"Expected `0 <= random_state <= 2**32 - 1`, got {seed}")
        if isinstance(self.init, str):
            raise NotImplementedError("the stand-in starts from given centres only")
        if self.n_init != 1:
            raise ValueError(f"n_init={self.n_init!r} with initial centres given: use n_init=1")
        x = X._a if isinstance(X, DeviceArray) else np.asarray(X)
        centers = (self.init._a if isinstance(self.init, DeviceArray) else np.asarray(self.init))
        centers = centers.astype(np.float64)
        if centers.shape != (self.n_clusters, x.shape[1]):
            raise ValueError(f"The shape of the initial centers {centers.shape} does not match "
                             f"the number of clusters {self.n_clusters} and features {x.shape[1]}")
        prev = np.inf
        for it in range(1, self.max_iter + 1):
            self.n_iter_ = it
            d2 = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
            labels = d2.argmin(axis=1)
            inertia = d2[np.arange(len(x)), labels].sum()
            for c in range(self.n_clusters):
                members = x[labels == c]
                if len(members):
                    centers[c] = members.mean(axis=0)
            if prev - inertia <= self.tol * inertia:
                break
            prev = inertia
        out = centers.astype(np.float32)
        self.cluster_centers_ = DeviceArray(out) if self.output_type == "cupy" else out
        return self
