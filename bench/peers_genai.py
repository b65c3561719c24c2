"""ONNX Runtime GenAI as a peer of prunert's decoder (bench/bench_peers.py): the Llama part of a LLaVA checkpoint as
its own Hugging Face `LlamaForCausalLM` directory, ORT-genai's model builder run on it, and its Generator timed.

    extract_llama(checkpoint, out)            config.json from text_config, language_model.* / lm_head weights renamed, tokenizer
    build_genai(llama, out, precision, int4)  python -m onnxruntime_genai.models.builder -i LLAMA -o OUT -p fp32|int4 -e cpu
    GenaiPeer(model_dir, ...)                 prefill(ids) -> s; decode(steps) -> (s, tokens)

Builds are cached under the bench's --work directory, keyed by the checkpoint and the builder settings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

GENAI_VERSION = "0.18.0"  # pyproject.toml extra `peers`
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
STAMP = "prunert_peer.json"  # what a cached directory was made from
# LLaVA checkpoint names -> LlamaForCausalLM names (both on-disk layouts transformers writes); anything else is dropped
RENAMES = (("language_model.model.", "model."), ("model.language_model.", "model."),
           ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


@dataclass(frozen=True)
class Int4Settings:
    """MatMulNBits weight-only settings, passed to ORT-genai's builder as --extra_options (the same as prunert's int4
    variant: bench_peers.int4_settings reads them from its manifest settings where it records them)."""

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4  # 4: int8 activations inside MatMulNBits (ORT-genai's CPU default and prunert's); 0: unset
    quantize_lm_head: bool = True

    def extra_options(self) -> list[str]:
        options = [f"block_size={self.block_size}", f"is_symmetric={str(self.symmetric).lower()}",
                   f"accuracy_level={self.accuracy_level}"]
        return options + ([] if self.quantize_lm_head else ["nodes_to_exclude=/lm_head/MatMul"])


def _stamp_matches(directory: Path, stamp: dict) -> bool:
    path = directory / STAMP
    return path.is_file() and json.loads(path.read_text()) == stamp


def _publish(staging: Path, directory: Path, stamp: dict) -> None:
    (staging / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)


def extract_llama(checkpoint: Path, out: Path) -> Path:
    """The decoder of a LLaVA checkpoint directory as a LlamaForCausalLM directory at `out` (reused when made from
    the same checkpoint files)."""
    from safetensors.numpy import load_file, save_file

    files = sorted(checkpoint.glob("*.safetensors"))
    stamp = {"checkpoint": str(checkpoint), "files": {f.name: f.stat().st_size for f in files}}
    if _stamp_matches(out, stamp):
        return out
    config = json.loads((checkpoint / "config.json").read_text())
    text = {**config["text_config"], "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}
    if text.get("model_type") != "llama":
        raise SystemExit(f"bench: error: {checkpoint}: text_config model_type {text.get('model_type')!r}, expected 'llama'")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "config.json").write_text(json.dumps(text, indent=2) + "\n")
    weights = {}
    for file in files:
        for name, value in load_file(file).items():
            new = next((to + name[len(prefix):] for prefix, to in RENAMES if name.startswith(prefix)), None)
            if new is not None:
                weights[new] = value
    if "lm_head.weight" not in weights or "model.embed_tokens.weight" not in weights:
        raise SystemExit(f"bench: error: {checkpoint}: no language_model embed_tokens / lm_head weights found")
    save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, staging / name)
    _publish(staging, out, stamp)
    return out


def build_genai(llama: Path, out: Path, precision: str, int4: Int4Settings, log=print, timeout: float = 1800) -> tuple[Path, float | None]:
    """ORT-genai's model builder on `llama` at fp32 or int4 for the CPU EP -> (model dir, build seconds; None: reused)."""
    options = int4.extra_options() if precision == "int4" else []
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(llama), "-o", "OUT", "-p", precision,
               "-e", "cpu", "-c", str(out.parent / "builder-cache")] + (["--extra_options", *options] if options else [])
    stamp = {"llama": json.loads((llama / STAMP).read_text()), "command": command[1:], "genai": genai_version()}
    if _stamp_matches(out, stamp):
        return out, None
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    log(f"ORT-genai model builder, {precision}: {' '.join(command[3:]).replace('OUT', str(out))}")
    start = time.perf_counter()
    done = subprocess.run([str(staging) if c == "OUT" else c for c in command], capture_output=True, text=True, check=False,
                          timeout=timeout)
    if done.returncode or not (staging / "genai_config.json").is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"bench: error: ORT-genai's model builder failed ({precision}, exit {done.returncode}):\n{tail}")
    seconds = time.perf_counter() - start
    _publish(staging, out, stamp)
    return out, seconds


def genai_version() -> str:
    import importlib.metadata as md

    return md.version("onnxruntime-genai")


def settings_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts]).encode()).hexdigest()[:10]


class GenaiPeer:
    """ORT-genai's Generator on one built model: greedy, KV cache in its past/present shared buffer of max_length."""

    def __init__(self, model_dir: Path, threads: int, session_config: dict[str, str], max_length: int):
        import onnxruntime  # noqa: F401  (loads the onnxruntime library ORT-genai binds to)
        import onnxruntime_genai as og

        self.og, self.model_dir, self.max_length = og, model_dir, max_length
        config = og.Config(str(model_dir))
        self.session_options = {"intra_op_num_threads": threads, **session_config}  # string values: ORT config entries
        config.overlay(json.dumps({"model": {"decoder": {"session_options": self.session_options}},
                                   "search": {"max_length": max_length, "do_sample": False, "past_present_share_buffer": True}}))
        self.model = og.Model(config)
        self.generator = None

    def graph(self) -> dict:
        """What this peer runs: its graph's node count, session options and KV capacity."""
        import onnx

        name = json.loads((self.model_dir / "genai_config.json").read_text())["model"]["decoder"]["filename"]
        nodes = len(onnx.load(str(self.model_dir / name), load_external_data=False).graph.node)
        return {"nodes": nodes, "session_options": self.session_options, "max_length": self.max_length}

    def prefill(self, ids: np.ndarray) -> float:
        """A fresh Generator (its buffers allocated outside the timing), then the prompt's ids [L] run through it."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        self.generator = self.og.Generator(self.model, params)
        start = time.perf_counter()
        self.generator.append_tokens(np.asarray(ids, np.int32)[None])  # [1, L]
        return time.perf_counter() - start

    def begin(self) -> None:
        """Decoding from the prefill, advanced by advance(): as prunert's decode_steps, the first generate_next_token
        chooses from the prefill's logits, each later one first runs the model on the previous token."""

    def advance(self, calls: int) -> tuple[float, list[int]]:
        """The next `calls` generate_next_token -> seconds, their tokens."""
        tokens, generator = [], self.generator
        start = time.perf_counter()
        for _ in range(calls):
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return time.perf_counter() - start, tokens

    def decode(self, steps: int) -> tuple[float, list[int]]:
        """`steps` decoder calls after the prefill -> steps + 1 tokens."""
        self.begin()
        return self.advance(steps + 1)
