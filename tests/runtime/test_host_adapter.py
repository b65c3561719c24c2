"""The runtime's declared host contract (prunert.runtime.host): a fourth family's host needs only the three abstract
methods, every optional hook has its default, the runtime finds hosts through the one registry lookup, and no
generic code probes adapters or hosts with getattr."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prunert.adapters import FAMILIES, host_adapter_class
from prunert.errors import ConfigError, ModelSourceError
from prunert.runtime.host import HostAdapter, SpliceLayout

REPO = Path(__file__).resolve().parents[2]


class FourthHost(HostAdapter):
    """A minimal new family: fixed-size pixels, 1-D positions; only the abstract methods."""

    def vision_inputs(self, images, preprocessor_config):
        return {"pixel_values": np.zeros((len(images), 3, 8, 8), np.float32)}  # [B, 3, 8, 8]

    def position_ids(self, attention_mask, layout):
        return np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0)  # [B, L]

    def next_position_ids(self, position_ids, attention_mask):
        return position_ids[:, -1:] + 1  # [B, 1]


def test_a_fourth_family_host_needs_only_the_abstract_methods() -> None:
    host = FourthHost({"anything": 1}, num_visual_tokens=36)
    assert host.family_config == {"anything": 1} and host.num_visual_tokens == 36
    assert host.one_image_per_vision_call is False
    kept = np.array([[0, 3, 7], [1, 2, 5]])
    assert host.kept_valid({}, kept).tolist() == [[True] * 3] * 2  # every slot real
    counts = host.visual_token_counts({}, 2)
    assert counts.tolist() == [36, 36] and counts.dtype == np.int64  # the manifest's N, per image
    with pytest.raises(ConfigError, match="FourthHost has no single model view"):
        host.model_view(Image.new("RGB", (20, 20)), {})


def test_a_host_missing_an_abstract_method_cannot_be_built() -> None:
    class NoPositions(HostAdapter):
        def vision_inputs(self, images, preprocessor_config):
            return {}

    with pytest.raises(TypeError, match="next_position_ids"):
        NoPositions({}, 1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_registers_a_host_adapter(family: str) -> None:
    host_class = host_adapter_class(family)
    assert issubclass(host_class, HostAdapter) and not host_class.__abstractmethods__


def test_an_unknown_family_is_a_clear_error() -> None:
    with pytest.raises(ModelSourceError, match="model family 'gemma3': not supported"):
        host_adapter_class("gemma3")


def test_the_artifact_host_is_bound_to_its_manifest(tiny_artifact: Path) -> None:
    from prunert.adapters.llava.host import LlavaHostAdapter
    from prunert.runtime import Artifact

    artifact = Artifact(tiny_artifact)
    host = artifact.host
    assert type(host) is LlavaHostAdapter
    assert host.family_config == artifact.manifest.family_config
    assert host.num_visual_tokens == artifact.manifest.budget.num_visual_tokens


def test_the_hosts_own_data_goes_back_to_the_host_only(tiny_artifact: Path) -> None:
    """An entry the vision graph does not take stays the host's: it is not fed to the graph, and it comes back to
    the host's hooks and, through the SpliceLayout, to its position ids (no family data by name in the runtime)."""
    from prunert.adapters.llava.host import LlavaHostAdapter
    from prunert.runtime import VLMPipeline

    seen: dict[str, object] = {}

    class WithOwnData(LlavaHostAdapter):
        def vision_inputs(self, images, preprocessor_config):
            own = np.array([[image.width, image.height] for image in images], np.int64)  # [B, 2], not a graph input
            return {**super().vision_inputs(images, preprocessor_config), "image_sizes": own}

        def visual_token_counts(self, vision_inputs, num_images):
            seen["counts"] = vision_inputs["image_sizes"]
            return super().visual_token_counts(vision_inputs, num_images)

        def position_ids(self, attention_mask, layout: SpliceLayout):
            seen["layout"] = layout
            return super().position_ids(attention_mask, layout)

    pipe = VLMPipeline(tiny_artifact)
    manifest = pipe.manifest
    pipe.artifact.__dict__["host"] = WithOwnData(manifest.family_config, manifest.budget.num_visual_tokens)
    prompts = [f"{manifest.text.placeholder}\nWhat is this?"] * 2
    images = [Image.new("RGB", (60, 40), (200, 10, 10)), Image.new("RGB", (48, 64), (10, 10, 200))]
    vision = pipe.encode_images(images, prompts)  # the runner would refuse an input the graph does not have
    assert seen["counts"].tolist() == [[60, 40], [48, 64]]
    pipe.splice(pipe.tokenize(prompts), vision)
    layout = seen["layout"]
    assert [out["image_sizes"].tolist() for out in layout.host_outputs] == [[[60, 40], [48, 64]]]  # one batched call
    assert [list(k) for k in layout.kept_indices] == [list(k) for k in vision.kept_indices]


# ------------------------------------------------------------------------------------------ no probing
PROBED = ("adapter", "host")  # names of the objects generic code must call, not probe


def _probes(path: Path) -> list[str]:
    """getattr/hasattr calls on an adapter or host (any expression naming one), or looking up an adapter hook by name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") and node.args:
            target = ast.unparse(node.args[0]).lower()
            name = ast.unparse(node.args[1]) if len(node.args) > 1 else ""
            if any(word in target for word in PROBED) or any(word in name.lower() for word in ("adapter", "host")):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_generic_code_never_probes_adapters_or_hosts() -> None:
    files = [f for folder in ("export", "runtime", "parity") for f in sorted((REPO / "prunert" / folder).rglob("*.py"))]
    assert files
    assert [probe for f in files for probe in _probes(f)] == []


def test_the_runtime_reaches_adapter_packages_only_through_the_registry() -> None:
    """prunert.runtime imports only the registry module prunert.adapters (stdlib only), never a family package; hosts
    come from its host_adapter_class."""
    imports = []
    for path in sorted((REPO / "prunert" / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prunert.adapters"):
                imports.append((path.name, node.module, tuple(alias.name for alias in node.names)))
            elif isinstance(node, ast.Import):
                imports += [(path.name, alias.name, ()) for alias in node.names if alias.name.startswith("prunert.adapters")]
    assert {module for _, module, _ in imports} == {"prunert.adapters"}
    assert ("artifact.py", "prunert.adapters", ("host_adapter_class",)) in imports
