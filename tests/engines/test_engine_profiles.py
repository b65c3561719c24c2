"""Optimization profiles derived from the tiny artifact's manifest: every dim resolved, the runtime's
real shapes covered, flags above the exported maxima refused with the flag and the maximum named."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from prunert.config import EngineBuildConfig
from prunert.engines.profiles import PROMPT_OPT, TEXT_OPT, Profile, check_profiles, derive_profiles, select_profile
from prunert.errors import ArtifactError, ConfigError
from prunert.manifest import Manifest, load_manifest


@pytest.fixture(scope="module")
def manifest(tiny_artifact: Path) -> Manifest:
    return load_manifest(tiny_artifact)


def test_vision_profile(manifest: Manifest) -> None:
    (profile,) = derive_profiles(manifest, "vision", EngineBuildConfig())
    text, batch = manifest.text, manifest.text.max_batch
    hidden = manifest.decoder.hidden_size
    assert profile.name == "vision"
    assert list(profile.shapes) == [t.name for t in manifest.graphs["vision"].inputs]
    assert profile.shapes["pixel_values"] == ((1, 3, 140, 140), (1, 3, 140, 140), (batch, 3, 140, 140))
    assert profile.shapes["text_embeds"] == ((1, 1, hidden), (1, min(TEXT_OPT, text.max_text_tokens), hidden), (batch, text.max_text_tokens, hidden))
    assert profile.shapes["text_mask"] == ((1, 1), (1, min(TEXT_OPT, text.max_text_tokens)), (batch, text.max_text_tokens))


def test_decoder_profiles(manifest: Manifest) -> None:
    context, generation = derive_profiles(manifest, "decoder", EngineBuildConfig(opt_batch=2))
    top, dec = manifest.text.max_sequence, manifest.decoder
    kv = (dec.num_kv_heads, dec.head_dim)
    opt = manifest.budget.budget + min(manifest.text.max_prompt_tokens - 1, PROMPT_OPT)
    assert (context.name, generation.name) == ("context", "generation")
    assert context.shapes["inputs_embeds"] == ((1, 1, dec.hidden_size), (2, opt, dec.hidden_size), (8, top, dec.hidden_size))
    assert context.shapes["attention_mask"] == ((1, 1), (2, opt), (8, top))  # total = sequence
    assert context.shapes["past_key_values.0.key"] == ((1, kv[0], 0, kv[1]), (2, kv[0], 0, kv[1]), (8, kv[0], 0, kv[1]))
    assert generation.shapes["inputs_embeds"][2] == (8, 1, dec.hidden_size)
    assert generation.shapes["position_ids"] == ((1, 1), (2, 1), (8, 1))
    low, mid, high = generation.shapes["past_key_values.1.value"]
    assert (low[2], high[2]) == (1, top - 1)
    assert generation.shapes["attention_mask"] == ((1, 2), (2, mid[2] + 1), (8, top))  # total = past + 1
    names = [t.name for t in manifest.graphs["decoder"].inputs]
    assert list(context.shapes) == names and list(generation.shapes) == names
    assert len(names) == 3 + 2 * dec.num_layers


def test_profiles_cover_the_runtime_shapes(manifest: Manifest) -> None:
    """Prefill (past 0) picks "context", every decode step "generation", up to the maximum sequence."""
    profiles = derive_profiles(manifest, "decoder", EngineBuildConfig())
    dec = manifest.decoder

    def shapes(batch: int, seq: int, past: int) -> dict:
        kv = (batch, dec.num_kv_heads, past, dec.head_dim)
        out = {"inputs_embeds": (batch, seq, dec.hidden_size), "attention_mask": (batch, past + seq), "position_ids": (batch, seq)}
        return {**out, **{name: kv for name in list(profiles[0].shapes)[3:]}}

    top = manifest.text.max_sequence
    assert select_profile(profiles, shapes(1, 30, 0)) == 0
    assert select_profile(profiles, shapes(8, top, 0)) == 0
    assert select_profile(profiles, shapes(3, 1, 30)) == 1
    assert select_profile(profiles, shapes(3, 1, top - 1)) == 1
    assert select_profile(profiles, shapes(3, 1, top)) == -1  # one past the exported maximum
    assert select_profile(profiles, shapes(9, 1, 5)) == -1
    assert select_profile(profiles, shapes(2, 4, 5)) == -1  # chunked prefill is not a profile


def test_smaller_limits(manifest: Manifest) -> None:
    (vision,) = derive_profiles(manifest, "vision", EngineBuildConfig(max_batch=2))
    assert vision.shapes["pixel_values"][2][0] == 2
    context, generation = derive_profiles(manifest, "decoder", EngineBuildConfig(max_batch=2, max_seq=40))
    assert context.shapes["inputs_embeds"][2][:2] == (2, 40)
    assert generation.shapes["past_key_values.0.key"][2][2] == 39
    assert generation.shapes["attention_mask"][2] == (2, 40)
    for profile in (context, generation):  # every triple consistent: total = past + sequence
        for i in range(3):
            seq = profile.shapes["inputs_embeds"][i][1]
            past = profile.shapes["past_key_values.0.key"][i][2]
            assert profile.shapes["attention_mask"][i][1] == past + seq


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"max_batch": 9}, ["--max-batch: got 9", "at most 8"]),
        ({"max_seq": 80}, ["--max-seq: got 80", "at most 79"]),
        ({"max_seq": 17}, ["--max-seq: got 17", "at least 18"]),
        ({"opt_batch": 3, "max_batch": 2}, ["--opt-batch: got 3", "<= 2"]),
    ],
)
def test_flags_outside_the_maxima(manifest: Manifest, kwargs: dict, needles: list[str]) -> None:
    for graph in ("vision", "decoder"):
        with pytest.raises(ConfigError) as info:
            derive_profiles(manifest, graph, EngineBuildConfig(**kwargs))
        for needle in needles:
            assert needle in str(info.value)


def test_missing_variant_and_unknown_graph(manifest: Manifest) -> None:
    with pytest.raises(ArtifactError, match="prunert convert ARTIFACT --precision fp16"):
        derive_profiles(manifest, "vision", EngineBuildConfig(precision="fp16"))
    with pytest.raises(ArtifactError, match="no graph 'audio'"):
        derive_profiles(manifest, "audio", EngineBuildConfig())


def test_unknown_symbolic_dim(manifest: Manifest) -> None:
    spec = manifest.graphs["vision"]
    odd = replace(spec.inputs[0], shape=("batch", 3, "height", 140))
    broken = replace(manifest, graphs={**manifest.graphs, "vision": replace(spec, inputs=(odd, *spec.inputs[1:]))})
    with pytest.raises(ArtifactError, match="symbolic dim 'height'"):
        derive_profiles(broken, "vision", EngineBuildConfig())


def test_check_profiles_rejects_mismatches(manifest: Manifest) -> None:
    spec = manifest.graphs["vision"]
    (good,) = derive_profiles(manifest, "vision", EngineBuildConfig())
    check_profiles(spec, [good])

    def broken(name: str, triple) -> Profile:
        return Profile("bad", {**good.shapes, name: triple})

    cases = {
        "rank 3, expected 4": broken("pixel_values", ((1, 3, 140), (1, 3, 140), (2, 3, 140))),
        "static 3": broken("pixel_values", ((1, 4, 140, 140), (1, 4, 140, 140), (2, 4, 140, 140))),
        "min <= opt <= max": broken("text_mask", ((2, 1), (1, 1), (2, 1))),
        "dim 'text' is": broken("text_mask", ((1, 1), (1, 8), (8, 32))),
    }
    for needle, profile in cases.items():
        with pytest.raises(ArtifactError, match=needle.replace("(", r"\(")):
            check_profiles(spec, [profile])
    missing = Profile("bad", {k: v for k, v in good.shapes.items() if k != "text_mask"})
    with pytest.raises(ArtifactError, match="covers inputs"):
        check_profiles(spec, [missing])
    with pytest.raises(ArtifactError, match="no optimization profiles"):
        check_profiles(spec, [])


def test_profile_dict_round_trip(manifest: Manifest) -> None:
    for profile in derive_profiles(manifest, "decoder", EngineBuildConfig()):
        data = profile.to_dict()
        assert data["shapes"]["attention_mask"][0] == list(profile.shapes["attention_mask"][0])
        assert Profile.from_dict(data) == profile
    with pytest.raises(ArtifactError, match="not a profile"):
        Profile.from_dict({"name": "x", "shapes": {"a": [[1], [2]]}})
