"""A checkpoint whose safetensors do not hold exactly the weights its config.json needs is an export error
naming them (prunert.adapters.hf_loading.check_loading_info), never an artifact of randomly initialised weights
and never transformers' size-mismatch traceback. LLaVA-1.5 and Qwen2.5-VL tiny presets, tampered copies."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from prunert import cli

Tensors = dict[str, torch.Tensor]


def _tampered(source: Path, root: Path, change: Callable[[Tensors], Tensors]) -> Path:
    """A copy of the checkpoint at `source` whose model.safetensors holds change(its tensors)."""
    copy = root / "checkpoint"
    shutil.copytree(source, copy)
    (weights,) = copy.glob("*.safetensors")
    save_file(change(load_file(weights)), weights, metadata={"format": "pt"})
    return copy


def _without(part: str) -> Callable[[Tensors], Tensors]:
    return lambda tensors: {name: t for name, t in tensors.items() if part not in name}


def _with_extra(tensors: Tensors) -> Tensors:
    return {**tensors, "vision_tower.extra_head.weight": torch.zeros(4, 4), "unused.bias": torch.zeros(4)}


def _widened(part: str) -> Callable[[Tensors], Tensors]:
    def change(tensors: Tensors) -> Tensors:
        name = next(n for n in sorted(tensors) if part in n and tensors[n].ndim == 2)
        return {**tensors, name: torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)}

    return change


@pytest.fixture(scope="module")
def llava_dir() -> Path:
    from prunert.adapters.llava.synthetic import synthetic_checkpoint

    return synthetic_checkpoint("llava-tiny")


@pytest.fixture(scope="module")
def qwen_dir() -> Path:
    from prunert.adapters.qwen2_5_vl.synthetic import synthetic_checkpoint

    return synthetic_checkpoint("qwen2.5-vl-tiny")


def _export(capsys, model: Path, out: Path, budget: int) -> tuple[int, str]:
    code = cli.main(["export", "--model", str(model), "--budget", str(budget), "--max-prompt-tokens", "32",
                     "--max-new-tokens", "4", "--out", str(out)])
    return code, capsys.readouterr().err


CASES = {
    # family, how the copy is tampered with, what the one error line names
    "llava-no-projector": ("llava", _without("multi_modal_projector"), ["4 missing weight(s)", "multi_modal_projector.linear_1.bias"]),
    "llava-extra": ("llava", _with_extra, ["2 unexpected weight(s)", "unused.bias", "vision_tower.extra_head.weight"]),
    "llava-shape": ("llava", _widened("q_proj"), ["1 weight(s) whose shape contradicts config.json", "q_proj.weight [64, 65]"]),
    "qwen-no-merger": ("qwen", _without("visual.merger.mlp"), ["4 missing weight(s)", "merger.mlp.0.bias", "(1 more)"]),
    "qwen-shape": ("qwen", _widened("visual.merger.mlp"), ["whose shape contradicts config.json", "merger.mlp"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_incomplete_checkpoint_is_an_export_error(error_line, capsys, tmp_path: Path, llava_dir: Path, qwen_dir: Path, case: str) -> None:
    family, change, needles = CASES[case]
    model = _tampered(llava_dir if family == "llava" else qwen_dir, tmp_path, change)
    out = tmp_path / "artifact"
    code, err = _export(capsys, model, out, budget=8)
    assert code == 2, err
    error_line(err, str(model), "not a complete", *needles)
    assert not out.exists()


def test_complete_checkpoint_loads_with_empty_loading_info(llava_dir: Path) -> None:
    """The check is not a false alarm on the presets' own (complete) checkpoints: tied weights, non-persistent
    buffers and transformers' key renames are not reported."""
    from transformers import LlavaForConditionalGeneration

    from prunert.adapters.hf_loading import load_hf_model

    model = load_hf_model(LlavaForConditionalGeneration, llava_dir, "LLaVA-1.5")
    assert not model.training


def test_check_loading_info_lists_the_first_few_and_counts() -> None:
    from prunert.adapters.hf_loading import check_loading_info
    from prunert.errors import ModelSourceError

    info = {"missing_keys": {f"layer.{i}.weight" for i in range(7)}, "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    with pytest.raises(ModelSourceError, match=r"7 missing weight\(s\): layer\.0\.weight, layer\.1\.weight, layer\.2\.weight, \.\.\. \(4 more\)"):
        check_loading_info(info, Path("ckpt"), "LLaVA-1.5")
    check_loading_info({"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}, Path("ckpt"), "LLaVA-1.5")
