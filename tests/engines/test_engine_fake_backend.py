"""A CPU stand-in for tensorrt + cuda-python, so the builder and the TensorRT runner are exercised here.

`install(monkeypatch)` puts fake `tensorrt` and `cuda.bindings.runtime` modules in sys.modules:
- device memory is real host memory (numpy byte arrays); cudaMemcpyAsync is a bounds-checked memmove,
  so a wrong size, a stale pointer or an overlapping past/present binding fails loudly;
- the "engine" is a JSON plan naming the ONNX file and the optimization profiles; execution reads the
  inputs from their bound addresses, runs ONNX Runtime and writes the outputs to their addresses, and
  set_input_shape refuses shapes outside the context's profile, as TensorRT does.
Other test modules get it through the `fake_trt` fixture (tests/conftest.py loads this file by path); the test below checks the fake.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types

import numpy as np


class Status(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidValue = 1


class FakeCudart(types.ModuleType):
    cudaError_t = Status
    cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", "cudaMemcpyHostToDevice cudaMemcpyDeviceToHost cudaMemcpyDeviceToDevice")

    def __init__(self, cc: tuple[int, int] = (8, 7), name: str = "Fake Orin") -> None:
        super().__init__("cuda.bindings.runtime")
        self.memory: dict[int, np.ndarray] = {}
        self.mallocs = 0
        self.fail_malloc = False
        self.props = types.SimpleNamespace(major=cc[0], minor=cc[1], name=name.encode() + b"\0" * 8)

    def region(self, ptr: int, nbytes: int) -> None:
        """Assert [ptr, ptr + nbytes) lies inside one live allocation."""
        for start, array in self.memory.items():
            if start <= ptr and ptr + nbytes <= start + array.nbytes:
                return
        raise AssertionError(f"device access [{ptr}, +{nbytes}) outside any allocation")

    def cudaMalloc(self, nbytes: int):
        if self.fail_malloc:
            return (Status.cudaErrorMemoryAllocation, 0)
        array = np.zeros(nbytes, np.uint8)
        self.memory[array.ctypes.data] = array
        self.mallocs += 1
        return (Status.cudaSuccess, array.ctypes.data)

    def cudaFree(self, ptr: int):
        self.memory.pop(int(ptr))
        return (Status.cudaSuccess,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind, stream):
        if kind != self.cudaMemcpyKind.cudaMemcpyDeviceToHost:
            self.region(dst, nbytes)
        if kind != self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.region(src, nbytes)
        ctypes.memmove(dst, src, nbytes)
        return (Status.cudaSuccess,)

    def cudaStreamCreate(self):
        return (Status.cudaSuccess, 4242)

    def cudaStreamSynchronize(self, stream):
        return (Status.cudaSuccess,)

    def cudaStreamDestroy(self, stream):
        return (Status.cudaSuccess,)

    def cudaGetDevice(self):
        return (Status.cudaSuccess, 0)

    def cudaGetDeviceCount(self):
        return (Status.cudaSuccess, 1)

    def cudaGetDeviceProperties(self, device):
        return (Status.cudaSuccess, self.props)

    def cudaGetErrorName(self, status):
        return (Status.cudaSuccess, Status(status).name.encode())


def _read(cudart: FakeCudart, ptr: int, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    cudart.region(ptr, nbytes)
    return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype).reshape(shape).copy()


def make_tensorrt(cudart: FakeCudart, version: str = "10.3.0") -> types.ModuleType:
    import onnx
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.builds = []  # plans built, for cache-hit assertions
    trt.deserialized = []
    trt.fail_build = False
    trt.dtype_overrides = {}  # tensor name -> TensorRT dtype name reported by engines

    class ILogger:
        Severity = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

        def __init__(self) -> None:
            pass

    class Logger(ILogger):
        WARNING = ILogger.Severity.WARNING

        def __init__(self, severity=None) -> None:
            super().__init__()

    class DataType:
        def __init__(self, name: str) -> None:
            self.name = name

    onnx_types = {1: "FLOAT", 7: "INT64", 10: "HALF", 6: "INT32", 9: "BOOL", 16: "BF16"}
    to_numpy = {"FLOAT": np.float32, "INT64": np.int64, "HALF": np.float16, "INT32": np.int32, "BOOL": np.bool_}

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.inputs, self.path = flags, [], None

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int):
            return types.SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        def __init__(self, network: Network, logger) -> None:
            self.network, self.errors = network, []

        def parse_from_file(self, path: str) -> bool:
            model = onnx.load(path, load_external_data=False)
            if any(node.op_type == "PrunertUnsupported" for node in model.graph.node):
                self.errors.append("In node 0 (PrunertUnsupported): UNSUPPORTED_NODE")
                return False
            initializers = {i.name for i in model.graph.initializer}
            self.network.inputs = [i.name for i in model.graph.input if i.name not in initializers]
            self.network.path = path
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class OptimizationProfile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name, low, opt, high) -> None:
            self.shapes[name] = [list(low), list(opt), list(high)]

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data

    class BuilderConfig:
        def __init__(self) -> None:
            self.profiles, self.pool, self.builder_optimization_level, self.timing = [], {}, 3, None
            self.cleared = []  # no set_flag at all: precision comes from the graph (TensorRT 11 has no FP16/INT8 flags)

        def clear_flag(self, flag) -> None:
            self.cleared.append(flag.name)

        def set_memory_pool_limit(self, pool, size) -> None:
            self.pool[pool] = size

        def add_optimization_profile(self, profile) -> int:
            self.profiles.append(profile.shapes)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch) -> bool:
            self.timing = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            return self.timing

    class Builder:
        def __init__(self, logger) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: Network, config: BuilderConfig):
            if trt.fail_build:
                self.logger.log(ILogger.Severity.ERROR, "Error Code 4: Internal Error (out of memory)")
                return None
            config.timing.data += b"t"  # the build "learned" tactics
            plan = {"onnx": network.path, "profiles": config.profiles, "tensorrt": trt.__version__,
                    "strongly_typed": network.flags == 1, "level": config.builder_optimization_level,
                    "workspace": list(config.pool.values()), "cleared": config.cleared}
            trt.builds.append(plan)
            return json.dumps(plan).encode()

    class Context:
        def __init__(self, engine) -> None:
            self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}

        def set_optimization_profile_async(self, index: int, stream: int) -> bool:
            self.profile = index
            return True

        def set_input_shape(self, name: str, shape) -> bool:
            low, _, high = self.engine.plan["profiles"][self.profile][name]
            shape = tuple(int(d) for d in shape)
            if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
                return False
            self.shapes[name] = shape
            return True

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            assert ptr, f"null address for {name}"
            self.addresses[name] = int(ptr)
            return True

        def _outputs(self, feeds):
            return dict(zip(self.engine.outputs, self.engine.session.run(self.engine.outputs, feeds)))

        def get_tensor_shape(self, name: str):
            zeros = {n: np.zeros(s, to_numpy[self.engine.dtypes[n]]) for n, s in self.shapes.items()}
            return self._outputs(zeros)[name].shape

        def execute_async_v3(self, stream: int) -> bool:
            feeds = {n: _read(cudart, self.addresses[n], s, to_numpy[self.engine.dtypes[n]]) for n, s in self.shapes.items()}
            outputs = self._outputs(feeds)
            for name, value in outputs.items():
                value = np.ascontiguousarray(value)
                cudart.region(self.addresses[name], value.nbytes)
                for other in self.engine.inputs:  # outputs must never alias an input (past/present ping-pong)
                    itemsize = np.dtype(to_numpy[self.engine.dtypes[other]]).itemsize  # the input's own dtype
                    start, size = self.addresses[other], int(np.prod(self.shapes[other])) * itemsize
                    end = self.addresses[name] + value.nbytes
                    assert size == 0 or end <= start or start + size <= self.addresses[name], f"{name} overlaps {other}"
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
            return True

    class Engine:
        def __init__(self, plan: dict) -> None:
            self.plan = plan
            model = onnx.load(plan["onnx"], load_external_data=False)
            initializers = {i.name for i in model.graph.initializer}
            graph_inputs = [i for i in model.graph.input if i.name not in initializers]
            self.inputs = [i.name for i in graph_inputs]
            self.outputs = [o.name for o in model.graph.output]
            self.dtypes = {v.name: onnx_types[v.type.tensor_type.elem_type] for v in [*graph_inputs, *model.graph.output]}
            self.dtypes.update(trt.dtype_overrides)
            self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])

        num_io_tensors = property(lambda self: len(self.inputs) + len(self.outputs))
        num_optimization_profiles = property(lambda self: len(self.plan["profiles"]))

        def get_tensor_name(self, i: int) -> str:
            return (self.inputs + self.outputs)[i]

        def get_tensor_mode(self, name: str):
            return trt.TensorIOMode.INPUT if name in self.inputs else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType(self.dtypes[name])

        def get_tensor_profile_shape(self, name: str, index: int):
            return [tuple(s) for s in self.plan["profiles"][index][name]]

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes):
            trt.deserialized.append(len(data))
            plan = json.loads(bytes(data))
            return Engine(plan) if plan["tensorrt"] == trt.__version__ else None

    trt.ILogger, trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = ILogger, Logger, Builder, OnnxParser, Runtime
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {"TF32": 6})
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", "NONE INPUT OUTPUT")
    return trt


def install(monkeypatch, version: str = "10.3.0", cc: tuple[int, int] = (8, 7)):
    """Fake tensorrt + cuda-python in sys.modules for one test; returns (trt, cudart)."""
    cudart = FakeCudart(cc)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module)
    trt = make_tensorrt(cudart, version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt, cudart


# ---- the fake itself ---------------------------------------------------------------------------
def test_fake_memory_is_bounds_checked(monkeypatch) -> None:
    import pytest

    from prunert.runtime import cuda

    _, cudart = install(monkeypatch)
    stream, buffer = cuda.Stream(), cuda.DeviceBuffer(16)
    data = np.arange(4, dtype=np.float32)
    buffer.copy_from_host(data, stream)
    back = np.zeros(4, np.float32)
    buffer.copy_to_host(back, stream)
    assert np.array_equal(back, data)
    with pytest.raises(AssertionError, match="outside any allocation"):
        cudart.cudaMemcpyAsync(int(buffer) + 8, data.ctypes.data, 16, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, 0)
