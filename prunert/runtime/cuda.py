"""A tiny wrapper over cuda-python's runtime API: device buffers, one stream, device queries.

cuda-python is imported lazily (it exists only where TensorRT runs); without it every entry point
raises BackendUnavailableError. Newer cuda-python (>= 12.6) exposes `cuda.bindings.runtime`; older
releases `cuda.cudart`; both are accepted. Every call's status is checked: a failure raises CudaError
with the CUDA error name (cudaErrorMemoryAllocation, ...).

Copies between numpy arrays and device memory are asynchronous on a stream: the host array must stay
alive, unmodified, until the stream is synchronized (callers keep a reference until then).
No torch, no tensorrt here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prunert.errors import BackendUnavailableError, PrunertError

CUDA_PYTHON_HINT = (
    "package cuda-python is not installed (pip install cuda-python; on Jetson pick the release matching "
    "JetPack's CUDA, e.g. cuda-python 12.6 for JetPack 6)"
)


class CudaError(PrunertError):
    """A CUDA runtime call failed (out of memory, no device, driver too old, ...)."""


def cudart() -> Any:
    """cuda-python's runtime module, or BackendUnavailableError naming cuda-python."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise BackendUnavailableError(f"backend 'tensorrt': {CUDA_PYTHON_HINT}") from None
    return runtime


def _status_value(status: Any) -> int:
    return int(getattr(status, "value", status))


def error_name(status: Any) -> str:
    """cudaErrorMemoryAllocation, ... for a cudaError_t (falls back to the enum's own name)."""
    try:
        result = cudart().cudaGetErrorName(status)
        name = result[1] if isinstance(result, tuple) else result
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the error name is best effort: never hide the original failure
        return str(getattr(status, "name", status))


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python return tuple (status, *values): raise CudaError on failure, else the value(s)."""
    status, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if _status_value(status) != 0:
        raise CudaError(f"CUDA {what} failed: {error_name(status)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def call(what: str, function: Any, *args: Any) -> Any:
    """function(*args) checked with `check`. cuda-python raises RuntimeError when it cannot even load the
    driver (libcuda.so.1 missing: no NVIDIA driver): that is BackendUnavailableError, not a CUDA error."""
    try:
        result = function(*args)
    except RuntimeError as exc:
        raise BackendUnavailableError(f"backend 'tensorrt': CUDA is not usable on this machine ({exc}); it needs an NVIDIA GPU and driver") from None
    return check(result, what)


def device_count() -> int:
    """Number of visible CUDA devices; 0 when there is none or no usable driver."""
    runtime = cudart()
    try:
        result = runtime.cudaGetDeviceCount()
    except RuntimeError:  # no driver library
        return 0
    if _status_value(result[0]) != 0:
        return 0
    return int(result[1])


def _properties(device: int | None) -> Any:
    runtime = cudart()
    if device is None:
        device = int(call("cudaGetDevice", runtime.cudaGetDevice))
    return call("cudaGetDeviceProperties", runtime.cudaGetDeviceProperties, device)


def compute_capability(device: int | None = None) -> str:
    """"major.minor" of the current (or given) device: "8.7" on Orin, "9.0" on H100."""
    props = _properties(device)
    return f"{int(props.major)}.{int(props.minor)}"


def device_name(device: int | None = None) -> str:
    name = _properties(device).name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return str(name).strip()


class Stream:
    """One CUDA stream; int(stream) is the handle TensorRT's execute_async_v3 takes."""

    def __init__(self) -> None:
        self._runtime = cudart()
        self.handle = call("cudaStreamCreate", self._runtime.cudaStreamCreate)

    def __int__(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        call("cudaStreamSynchronize", self._runtime.cudaStreamSynchronize, self.handle)

    def close(self) -> None:
        if self.handle is not None:
            try:
                self._runtime.cudaStreamDestroy(self.handle)
            finally:
                self.handle = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class DeviceBuffer:
    """nbytes of device memory (at least 1 byte is allocated: an empty tensor still needs a valid address)."""

    def __init__(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"DeviceBuffer: got {nbytes} bytes, expected >= 0")
        self._runtime = cudart()
        self.nbytes = int(nbytes)
        self.ptr: int | None = int(call(f"cudaMalloc({self.nbytes} bytes)", self._runtime.cudaMalloc, max(self.nbytes, 1)))

    def __int__(self) -> int:
        if self.ptr is None:
            raise CudaError("device buffer used after free")
        return self.ptr

    def copy_from_host(self, array: np.ndarray, stream: Stream) -> None:
        """Async host -> device copy of a C-contiguous array (keep `array` alive until stream sync)."""
        self._check_host(array)
        if array.nbytes:
            kind = self._runtime.cudaMemcpyKind.cudaMemcpyHostToDevice
            call("cudaMemcpyAsync(host->device)", self._runtime.cudaMemcpyAsync, int(self), array.ctypes.data, array.nbytes, kind, stream.handle)

    def copy_to_host(self, array: np.ndarray, stream: Stream) -> None:
        """Async device -> host copy of array.nbytes bytes into a C-contiguous writable array."""
        self._check_host(array)
        if not array.flags.writeable:
            raise ValueError("copy_to_host: the destination array is read-only")
        if array.nbytes:
            kind = self._runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost
            call("cudaMemcpyAsync(device->host)", self._runtime.cudaMemcpyAsync, array.ctypes.data, int(self), array.nbytes, kind, stream.handle)

    def copy_from_device(self, source: "DeviceBuffer", nbytes: int, stream: Stream) -> None:
        if nbytes > min(self.nbytes, source.nbytes):
            raise ValueError(f"copy_from_device: {nbytes} bytes exceed a buffer ({source.nbytes} -> {self.nbytes})")
        if nbytes:
            kind = self._runtime.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            call("cudaMemcpyAsync(device->device)", self._runtime.cudaMemcpyAsync, int(self), int(source), nbytes, kind, stream.handle)

    def _check_host(self, array: np.ndarray) -> None:
        if not array.flags.c_contiguous:
            raise ValueError("host array must be C-contiguous (np.ascontiguousarray)")
        if array.nbytes > self.nbytes:
            raise ValueError(f"host array of {array.nbytes} bytes does not fit a {self.nbytes}-byte device buffer")

    def free(self) -> None:
        if self.ptr is not None:
            try:
                self._runtime.cudaFree(self.ptr)
            finally:
                self.ptr = None

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass
