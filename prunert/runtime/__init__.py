"""The edge runtime: numpy, onnxruntime (or tensorrt), tokenizers, pillow. Never torch or transformers."""

from prunert.runtime.artifact import Artifact
from prunert.runtime.pipeline import Generation, VLMPipeline
from prunert.runtime.runner import OnnxRuntimeRunner, Runner

__all__ = ["Artifact", "Generation", "OnnxRuntimeRunner", "Runner", "VLMPipeline"]
