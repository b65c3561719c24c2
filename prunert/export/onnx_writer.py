"""A small ONNX graph writer that streams initializers into one external-data file as they are added, so a
graph built straight from a checkpoint's tensors (prunert.export.fused_decoder) never holds a second copy
of the weights: each tensor is written, then only its (offset, length) record stays in the proto.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ALIGNMENT = 4096  # offsets on page boundaries, so ONNX Runtime can map the file instead of copying it
MSFT = "com.microsoft"
ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64, "int32": TensorProto.INT32}


class GraphWriter:
    """Nodes, inputs, outputs and initializers of one graph; `save()` writes the .onnx beside its .data file."""

    def __init__(self, path: Path, name: str):
        self.path = Path(path)
        self.data_name = self.path.name + ".data"
        self.data = open(self.path.parent / self.data_name, "wb")
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.counter = 0

    # ---- tensors --------------------------------------------------------------------------------
    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer streamed to the data file (small ones, < 1 KiB, stay inside the proto)."""
        array = np.asarray(array, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        if array.nbytes < 1024:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        offset = self.data.tell()
        pad = -offset % ALIGNMENT
        self.data.write(b"\0" * pad)
        offset += pad
        self.data.write(array.tobytes())
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.initializers.append(tensor)
        return name

    def const(self, array: np.ndarray | Sequence[int] | float, dtype: str = "int64") -> str:
        """A small constant as an initializer with a fresh name."""
        return self.weight(self.fresh("const"), np.asarray(array, dtype=np.dtype(dtype)))

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}_{self.counter}"

    # ---- nodes ----------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, domain: str = "", name: str = "", **attrs) -> list[str]:
        """One node; outputs: a count (fresh names) or names ("" for an optional output left out). Returns the output names."""
        names = [self.fresh(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name or self.fresh(op_type), domain=domain, **attrs))
        return names

    def one(self, op_type: str, inputs: Sequence[str], domain: str = "", name: str = "", **attrs) -> str:
        return self.op(op_type, inputs, 1, domain, name, **attrs)[0]

    def add_input(self, name: str, dtype: str, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, ONNX_TYPES[dtype], list(shape)))
        return name

    def add_output(self, name: str, dtype: str, shape: Sequence[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, ONNX_TYPES[dtype], list(shape)))

    def save(self, opset: int) -> None:
        """Write the .onnx (the weights are already in the .data file). ONNX Runtime loads it in validation: the onnx
        checker cannot, as SimplifiedLayerNormalization is ONNX Runtime's op in the default domain."""
        self.data.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MSFT, 1)],
                                  producer_name="prunert")
        self.path.write_bytes(model.SerializeToString())

    def close(self) -> None:
        if not self.data.closed:
            self.data.close()
