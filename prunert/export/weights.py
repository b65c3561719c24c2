"""The torch weights during export, held once: the layout the graphs read them in, and their release before ONNX
Runtime validates the graphs (prunert.export.pipeline).

torch.onnx exports `nn.Linear` as MatMul(x, Transpose(W)), and its optimizer folds every Transpose of a weight into a
new, transposed copy while the torch model still holds the original: a second copy of every linear weight during the
decoder's export (the issue's `+ 4 x decoder params`). MatMulLinear keeps the weight as [in, out] instead, so the graph
reads it as it is: MatMul(x, W^T initializer), the same graph the fold gave, with no copy. And transformers maps the
checkpoint file: own_weights copies each tensor out and drops its file pages, so they are not resident twice either.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import torch


class MatMulLinear(torch.nn.Module):
    """`nn.Linear` whose parameter is the weight's transpose, [in, out] (`weight_t`): forward is x @ weight_t (+ bias),
    which the exporter writes as MatMul on that initializer. weight_t is a transposed VIEW of the [out, in] storage: no
    copy, and torch's CPU fp16 matmul takes its fast path on it (on a contiguous [in, out] copy it is ~70x slower).
    `weight` is the [out, in] tensor every reader of a Linear expects."""

    def __init__(self, linear: torch.nn.Linear, weight: torch.Tensor | None = None):
        """weight: the [out, in] storage to view (default: the Linear's own)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        source = linear.weight.detach() if weight is None else weight
        self.weight_t = torch.nn.Parameter(source.t(), requires_grad=False)  # [in, out], strides of the [out, in] storage
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()  # [out, in], a view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)  # [..., in] @ [in, out] -> [..., out]
        return y if self.bias is None else y + self.bias


def own_weights(model: torch.nn.Module) -> int:
    """Give the model its weights in its own memory, in the layout the graphs read: every `nn.Linear` becomes a
    MatMulLinear (a view: no copy), every tensor still mapped from the checkpoint file is copied out of it. One tensor at a time, each
    source's file pages dropped once copied (drop_file_pages): transformers maps the safetensors file, and every page
    the exporter reads would otherwise stay resident beside the copy. A Linear whose weight another module shares (a
    tied LM head) keeps its layout: the copy would not free it. Returns how many Linears were replaced."""
    shared, mapped = _shared_parameters(model), _mapped_checkpoint_ranges()
    replaced = 0
    with torch.no_grad():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear and id(child.weight) not in shared:
                    source = child.weight.detach()
                    own = source.clone() if _inside(source, mapped) else source  # out of the file mapping: the one copy
                    setattr(module, name, MatMulLinear(child, own))
                    child.weight = None
                    if own is not source:
                        drop_file_pages(source, mapped)
                    replaced += 1
        for tensor in (*model.parameters(), *model.buffers()):
            if _inside(tensor, mapped):
                source = tensor.data
                tensor.data = source.clone()
                drop_file_pages(source, mapped)
    return replaced


MADV_DONTNEED = 4  # linux/mman.h


def drop_file_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """madvise(MADV_DONTNEED) the whole pages of a tensor that lies in a file mapping of the checkpoint (a private map
    nothing wrote to: the kernel rereads the pages from the file if they are touched again); anything else is left
    alone. Call it only on a tensor the model no longer holds."""
    if not _inside(tensor, mapped):
        return
    import ctypes
    import mmap

    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    low, high = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE  # pages wholly inside
    if high > low:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), MADV_DONTNEED)


def _mapped_checkpoint_ranges() -> list[tuple[int, int]]:
    """Address ranges of *.safetensors files mapped into this process (Linux /proc/self/maps; elsewhere none)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[-1].endswith(".safetensors"):  # private (copy-on-write), never written here
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


def _inside(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> bool:
    address = tensor.data_ptr()
    return tensor.numel() > 0 and any(low <= address < high for low, high in mapped)


def _shared_parameters(model: torch.nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        seen[id(parameter)] = seen.get(id(parameter), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def release_weights(model: torch.nn.Module) -> None:
    """Free the torch weights before ONNX Runtime loads the exported graphs, so the two are never resident together:
    every parameter and buffer gets an empty tensor (the module cannot run afterwards), the exporter's leftovers are
    collected, and glibc returns the freed heap pages to the system."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = torch.empty(0, dtype=tensor.dtype)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the allocator keeps its pages, nothing breaks
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
