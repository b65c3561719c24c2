"""Opening an artifact checks what the manifest says against its graphs' declared shapes, its tokenizer and its
preprocessor config (prunert.runtime.manifest_checks, issue 10 section 2): each contradiction is one
`prunert: error:` line naming the manifest key, exit 2, before anything runs. A corrupt file under --no-verify
is one line naming the file. Exercised through `prunert run` and `prunert parity` in-process."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from prunert.errors import ArtifactError
from prunert.manifest import TensorSpec, load_manifest
from prunert.runtime import Artifact
from prunert.runtime import manifest_checks

REPO = Path(__file__).resolve().parents[2]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
PROMPT = "<image>\nWhat is in the picture?"
COMMANDS = {"inspect": [], "run": ["--image", str(PHOTO), "--prompt", PROMPT, "--max-new-tokens", "2"],
            "parity": ["--image", str(PHOTO), "--prompt", PROMPT]}


def _cli(main, command: str, artifact: Path, *extra: str) -> tuple[int, str, str]:
    return main(command, artifact, *COMMANDS[command], *extra)


def _set(section: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda data: (data[section] if section else data).update(values)


def _vision_output(index: int, shape: list[Any]) -> Callable[[dict[str, Any]], None]:
    return lambda data: data["graphs"]["vision"]["outputs"][index].update(shape=shape)


def _decoder_input(index: int, shape: list[Any]) -> Callable[[dict[str, Any]], None]:
    return lambda data: data["graphs"]["decoder"]["inputs"][index].update(shape=shape)


# manifest edit, the key the error names, and what it must say (the tiny artifact: K=16 of N=100, D=64, vocab 1024)
CONTRADICTIONS = {
    "budget-vs-visual-tokens": (_set("budget", budget=32), "'budget.budget' is 32", "visual_tokens (batch, 16, 64)"),
    "visual-tokens-width": (_vision_output(0, ["batch", 16, 48]), "'decoder.hidden_size' is 64", "visual_tokens (batch, 16, 48)"),
    "kept-indices-vs-budget": (_vision_output(1, ["batch", 12]), "'budget.budget' is 16", "kept_indices (batch, 12)"),
    "kept-indices-rank": (_vision_output(1, ["batch", 16, 1]), "'graphs.vision'", "expected [batch, K, D] and [batch, K]"),
    "num-visual-tokens-below-budget": (_set("budget", num_visual_tokens=8), "'budget.num_visual_tokens' is 8", "expected N >= the budget K=16"),
    "num-visual-tokens-zero": (_set("budget", num_visual_tokens=0), "'budget.num_visual_tokens' is 0", ">= the budget"),
    "budget-zero": (_set("budget", budget=0), "'budget.budget' is 0", "expected K >= 1"),
    "pad-beyond-vocab": (_set("text", pad_token_id=5000), "'text.pad_token_id' is 5000", "0..1023"),
    "eos-beyond-vocab": (_set("text", eos_token_ids=[2, 99999]), "'text.eos_token_ids[1]' is 99999", "0..1023"),
    "eos-not-an-int": (_set("text", eos_token_ids=["2"]), "'text.eos_token_ids[0]' is \"2\"", "a token id"),
    "bos-negative": (_set("text", bos_token_id=-1), "'text.bos_token_id' is -1", "0..1023"),
    "image-token-beyond-vocab": (_set("text", image_token_id=1024), "'text.image_token_id' is 1024", "0..1023"),
    "empty-eos": (_set("text", eos_token_ids=[]), "'text.eos_token_ids' is []", "at least one"),
    "max-sequence-below-one-prompt": (_set("text", max_sequence=40), "'text.max_sequence' is 40", "expected >= 63"),
    "max-batch-zero": (_set("text", max_batch=0), "'text.max_batch' is 0", ">= 1"),
    "alpha-nan": (lambda data: data["budget"]["params"].update(alpha=math.nan), "'budget.params.alpha' is NaN", "finite number >= 0"),
    "alpha-inf": (lambda data: data["budget"]["params"].update(alpha=math.inf), "'budget.params.alpha' is Infinity", "finite"),
    "alpha-negative": (lambda data: data["budget"]["params"].update(alpha=-1.0), "'budget.params.alpha' is -1.0", "finite number >= 0"),
    "tau-negative": (lambda data: data["budget"]["params"].update(tau=-0.5), "'budget.params.tau' is -0.5", ">= 0"),
    "epsilon-zero": (lambda data: data["budget"]["params"].update(epsilon=0.0), "'budget.params'", "epsilon: got 0.0, expected 0 < epsilon <= 1"),
    "relevance-unknown": (lambda data: data["budget"]["params"].update(relevance="min"), "'budget.params'", "relevance: got 'min'"),
    "param-wrong-type": (lambda data: data["budget"]["params"].update(normalize="yes"), "'budget.params.normalize' is \"yes\"", "expected bool"),
    "param-unknown": (lambda data: data["budget"]["params"].update(beta=1.0), "'budget.params'", "['beta'], which resprune does not take"),
    "method-unknown": (_set("budget", method="magic"), "'budget.method' is \"magic\"", "expected one of"),
    "family-unknown": (_set("source", family="gpt"), "'source.family' is \"gpt\"", "expected one of ['llava'"),
    "template-other-field": (_set("text", prompt_template="{system} USER: {prompt}"), "'text.prompt_template'", "['{system}', '{prompt}']"),
    "template-positional": (_set("text", prompt_template="USER: {} {prompt}"), "'text.prompt_template'", "exactly one {prompt}"),
    "template-no-prompt": (_set("text", prompt_template="USER: ASSISTANT:"), "'text.prompt_template'", "exactly one {prompt}"),
    "template-twice": (_set("text", prompt_template="{prompt} {prompt}"), "'text.prompt_template'", "exactly one {prompt}"),
    "template-conversion": (_set("text", prompt_template="USER: {prompt!r}"), "'text.prompt_template'", "['{prompt!r}']"),
    "template-attribute": (_set("text", prompt_template="USER: {prompt.__class__}"), "'text.prompt_template'", "{prompt.__class__}"),
    "template-unbalanced": (_set("text", prompt_template="USER: {prompt"), "'text.prompt_template'", "is not a format string"),
    "hidden-vs-decoder-graph": (_set("decoder", hidden_size=32), "'decoder.hidden_size' is 32", "inputs_embeds (batch, sequence, 64)"),
    "vocab-vs-logits": (_set("decoder", vocab_size=2048), "'decoder.vocab_size' is 2048", "logits (batch, sequence, 1024)"),
    "layers-vs-past": (_set("decoder", num_layers=3), "'decoder.num_layers' is 3", "4 past key/value inputs"),
    "kv-heads-vs-past": (_set("decoder", num_kv_heads=4), "'decoder.num_kv_heads' is 4", "past_key_values.0.key (batch, 2, past, 16)"),
    "head-dim-vs-past": (_decoder_input(3, ["batch", 2, "past", 8]), "'decoder.head_dim' is 16", "(batch, 2, past, 8)"),
    "image-token-id-vs-tokenizer": (_set("text", image_token_id=5), "'text.image_token_id' is 5", "gives '<image>' the id 4"),
}


@pytest.mark.parametrize("kind", sorted(CONTRADICTIONS))
def test_a_contradicting_manifest_is_one_error_line(edit_manifest, error_line, prunert_main, artifact_copy: Path, kind: str) -> None:
    change, key, needle = CONTRADICTIONS[kind]
    edit_manifest(artifact_copy, change)
    code, out, err = _cli(prunert_main, "run", artifact_copy)
    assert code == 2 and out == ""
    error_line(err, f"artifact '{artifact_copy}'", key, needle)


@pytest.mark.parametrize("kind", ["budget-vs-visual-tokens", "empty-eos", "alpha-nan", "template-other-field", "family-unknown"])
def test_inspect_shows_a_contradicting_manifest_and_exits_2(edit_manifest, error_line, prunert_main, artifact_copy: Path, kind: str) -> None:
    """inspect prints the manifest as it is (to see what is wrong), then the contradiction `run` would refuse."""
    change, key, needle = CONTRADICTIONS[kind]
    edit_manifest(artifact_copy, change)
    code, out, err = _cli(prunert_main, "inspect", artifact_copy)
    assert code == 2 and "files" in out
    error_line(err, f"artifact '{artifact_copy}'", key, needle)


@pytest.mark.parametrize("kind", ["budget-vs-visual-tokens", "alpha-nan", "template-other-field"])
def test_parity_refuses_a_contradicting_manifest(edit_manifest, error_line, prunert_main, artifact_copy: Path, kind: str) -> None:
    change, key, needle = CONTRADICTIONS[kind]
    edit_manifest(artifact_copy, change)
    code, out, err = _cli(prunert_main, "parity", artifact_copy)
    assert code == 2 and out == ""
    error_line(err, key, needle)
    assert not (artifact_copy / "parity.json").exists()


def test_the_exported_manifest_passes_every_check(tiny_artifact: Path) -> None:
    artifact = Artifact(tiny_artifact)
    manifest_checks.check_manifest(artifact.manifest)
    manifest_checks.check_tokenizer(artifact.manifest, artifact.tokenizer)


def test_a_symbolic_visual_token_count_is_accepted(tiny_artifact: Path) -> None:
    """Per-image families declare K as a dim name (Qwen2.5-VL unpruned: "merged"); only static sizes are compared."""
    manifest = load_manifest(tiny_artifact)
    vision = manifest.graphs["vision"]
    outputs = (TensorSpec("visual_tokens", "float32", (1, "merged", 64)), TensorSpec("kept_indices", "int64", (1, "merged")))
    symbolic = replace(manifest, graphs={**manifest.graphs, "vision": replace(vision, outputs=outputs)})
    manifest_checks.check_manifest(symbolic)
    wrong = replace(symbolic, budget=replace(manifest.budget, budget=17))
    outputs = (TensorSpec("visual_tokens", "float32", (1, 16, 64)), TensorSpec("kept_indices", "int64", (1, "merged")))
    with pytest.raises(ArtifactError, match=r"'budget.budget' is 17, but graphs.vision declares visual_tokens \(1, 16, 64\)"):
        manifest_checks.check_manifest(replace(wrong, graphs={**manifest.graphs, "vision": replace(vision, outputs=outputs)}))


def test_a_variant_graph_is_checked_too(tiny_artifact: Path) -> None:
    from prunert.manifest import VariantSpec

    manifest = load_manifest(tiny_artifact)
    vision = manifest.graphs["vision"]
    narrow = replace(vision, outputs=(replace(vision.outputs[0], shape=("batch", 8, 64)), vision.outputs[1]))
    variant = VariantSpec("fp16", {**manifest.graphs, "vision": narrow}, "test", {})
    with pytest.raises(ArtifactError, match=r"but variants.fp16.graphs.vision declares visual_tokens \(batch, 8, 64\)"):
        manifest_checks.check_manifest(replace(manifest, variants={"fp16": variant}))


# ------------------------------------------------------------------------------ corrupt files under --no-verify


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01 not what it should be \xff" * 8)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _npz(path: Path, table: np.ndarray) -> None:
    with path.open("wb") as handle:  # an .npz archive under the .npy name
        np.savez(handle, table=table)


CORRUPTIONS = {
    "vision-garbage": ("vision.onnx", _garbage, "ONNX Runtime cannot load it"),
    "vision-truncated": ("vision.onnx", _truncate, "ONNX Runtime cannot load it"),
    # the CPU backend runs the fused decoder (decoder.onnx is TensorRT's and the GPU backends' form)
    "fused-decoder-truncated": ("decoder_fused.onnx", _truncate, "ONNX Runtime cannot load it"),
    "embeddings-garbage": ("embed_tokens.npy", _garbage, "cannot read embed_tokens.npy"),
    "embeddings-truncated": ("embed_tokens.npy", _truncate, "cannot read embed_tokens.npy"),
    "embeddings-pickled": ("embed_tokens.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object)), "cannot read embed_tokens.npy"),
    "embeddings-wrong-shape": ("embed_tokens.npy", lambda p: np.save(p, np.zeros((1024, 32), np.float32)), "expected float (1024, 64)"),
    "embeddings-an-npz": ("embed_tokens.npy", lambda p: _npz(p, np.zeros((1024, 64), np.float32)), "expected one .npy array"),
    "embeddings-integers": ("embed_tokens.npy", lambda p: np.save(p, np.zeros((1024, 64), np.int64)), "expected float (1024, 64)"),
    "tokenizer-garbage": ("tokenizer.json", _garbage, "cannot read tokenizer.json"),
    "preprocessor-not-json": ("preprocessor_config.json", lambda p: p.write_text("{ truncated"), "cannot read preprocessor_config.json"),
    "preprocessor-not-utf8": ("preprocessor_config.json", _garbage, "cannot read preprocessor_config.json"),
    "preprocessor-a-list": ("preprocessor_config.json", lambda p: p.write_text("[1, 2]"), "preprocessor_config.json: is list, expected a JSON object"),
    "preprocessor-nested-deep": ("preprocessor_config.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
                                 "cannot read preprocessor_config.json: nested too deeply"),
}


def _preprocessor(**values: Any) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return change


BAD_PREPROCESSOR = {
    "size-a-string": ({"size": "big"}, "'size' is \"big\""),
    "size-negative": ({"size": {"shortest_edge": -140}}, "'size' is {\"shortest_edge\": -140}"),
    "crop-size-list-of-three": ({"crop_size": [1, 2, 3]}, "'crop_size' is [1, 2, 3]"),
    "mean-a-string": ({"image_mean": "abc"}, "'image_mean' is \"abc\""),
    "mean-two-values": ({"image_mean": [0.5, 0.5]}, "'image_mean' is [0.5, 0.5]"),
    "std-zero": ({"image_std": [0.2, 0.0, 0.2]}, "'image_std' is [0.2, 0.0, 0.2], expected non-zero values"),
    "resample-nine": ({"resample": 9}, "'resample' is 9"),
    "rescale-a-string": ({"rescale_factor": "1/255"}, "'rescale_factor' is \"1/255\""),
    "rescale-nan": ({"rescale_factor": math.nan}, "'rescale_factor' is NaN"),
    "flag-a-string": ({"do_normalize": "false"}, "'do_normalize' is \"false\""),
    "patch-size-zero": ({"patch_size": 0}, "'patch_size' is 0"),
    "pinpoints-flat": ({"image_grid_pinpoints": [56, 112]}, "'image_grid_pinpoints' is [56, 112]"),
}
CORRUPTIONS.update({f"preprocessor-{kind}": ("preprocessor_config.json", _preprocessor(**values), needle)
                    for kind, (values, needle) in BAD_PREPROCESSOR.items()})


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_no_verify_with_a_corrupt_file_is_one_error_line(error_line, prunert_main, artifact_copy: Path, kind: str) -> None:
    name, corrupt, needle = CORRUPTIONS[kind]
    corrupt(artifact_copy / name)
    code, out, err = _cli(prunert_main, "run", artifact_copy, "--no-verify")
    assert code == 2 and out == ""
    error_line(err, name, needle)
    code, _, err = _cli(prunert_main, "run", artifact_copy)  # without --no-verify the sha256 catches it first
    assert code == 2
    error_line(err, f"file '{name}' sha256")


def test_the_runtime_opens_only_listed_files(artifact_copy: Path) -> None:
    artifact = Artifact(artifact_copy)
    assert artifact.path("vision.onnx") == artifact_copy / "vision.onnx"
    (artifact_copy / "extra.onnx").write_bytes((artifact_copy / "vision.onnx").read_bytes())
    with pytest.raises(ArtifactError, match="'extra.onnx' is not listed in the manifest's files; it is not loaded"):
        artifact.path("extra.onnx")
