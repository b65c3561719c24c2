"""manifest.json's text.image_placeholder: written by export, optional on read (older manifests, schema 2
and 3, load without it and fall back to image_token through TextSpec.placeholder), type-checked."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from prunert.errors import ArtifactError
from prunert.manifest import MANIFEST_NAME, Manifest, load_manifest

QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def _rewrite(artifact: Path, edit) -> None:
    path = artifact / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_export_writes_the_placeholder(tiny_artifact: Path) -> None:
    data = json.loads((tiny_artifact / MANIFEST_NAME).read_text())
    assert data["text"]["image_placeholder"] == data["text"]["image_token"] == "<image>"  # LLaVA: the token itself
    text = load_manifest(tiny_artifact).text
    assert text.placeholder == text.image_placeholder == "<image>"


def test_placeholder_falls_back_to_the_image_token(tiny_artifact: Path) -> None:
    text = load_manifest(tiny_artifact).text
    qwen_like = replace(text, image_token="<|image_pad|>", image_placeholder=QWEN_PLACEHOLDER)
    assert qwen_like.placeholder == QWEN_PLACEHOLDER and qwen_like.image_token == "<|image_pad|>"
    assert replace(qwen_like, image_placeholder="").placeholder == "<|image_pad|>"


@pytest.mark.parametrize("schema", [2, 3])
def test_manifest_without_the_key_still_loads(artifact_copy: Path, schema: int) -> None:
    def edit(data: dict) -> None:
        del data["text"]["image_placeholder"]
        if schema == 2:
            data.pop("variants"), data.pop("engines")
        data["schema_version"] = schema

    _rewrite(artifact_copy, edit)
    text = load_manifest(artifact_copy).text  # manifest.json is not hashed: the files still verify
    assert text.image_placeholder == "" and text.placeholder == text.image_token == "<image>"


def test_placeholder_round_trips_and_is_type_checked(artifact_copy: Path) -> None:
    manifest = load_manifest(artifact_copy)
    qwen_like = replace(manifest, text=replace(manifest.text, image_placeholder=QWEN_PLACEHOLDER))
    assert Manifest.from_dict(json.loads(qwen_like.to_json())) == qwen_like
    assert "placeholder" not in json.loads(qwen_like.to_json())["text"]  # the property is not serialised

    _rewrite(artifact_copy, lambda data: data["text"].update(image_placeholder=5))
    with pytest.raises(ArtifactError, match=r"'manifest\.text\.image_placeholder' is 5, expected str"):
        load_manifest(artifact_copy)
