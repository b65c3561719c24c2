"""Prompts as people write them: a prompt without the image placeholder gets the image where the family's chat format
puts it (all three tiny families), chat templates (the checkpoint's own, stored in the artifact and its manifest, else
the family's default) rendered in Jinja2's sandbox as Hugging Face renders them, multi-turn messages through
VLMPipeline.chat_prompt / chat, and one clean error for messages or templates the runtime cannot take."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from prunert.config import BudgetConfig, ExportConfig, GenerationConfig
from prunert.errors import ArtifactError, PromptError
from prunert.manifest import load_manifest, sha256_file
from prunert.runtime.chat import ARTIFACT_CHAT_TEMPLATE, ChatFormat, checkpoint_chat_template, user_turn
from prunert.runtime.text import ChatPrompt

REPO = Path(__file__).resolve().parents[2]
PHOTO = REPO / "examples" / "images" / "astronaut.jpg"
QUESTION = "What is in the picture?"
GREEDY = GenerationConfig(max_new_tokens=6)
IMAGE = {"type": "image"}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def llava_format() -> ChatFormat:
    from prunert.adapters.llava.host import LLAVA_CHAT_TEMPLATE

    return ChatFormat(LLAVA_CHAT_TEMPLATE, "test", "<image>", (("bos_token", "<s>"), ("eos_token", "</s>")))


def add_template(artifact: Path, source: str, edit_manifest) -> None:
    """Give an artifact copy a chat template of its own, listed and hashed as export does."""
    (artifact / ARTIFACT_CHAT_TEMPLATE).write_text(source, encoding="utf-8")
    digest = sha256_file(artifact / ARTIFACT_CHAT_TEMPLATE)

    def change(data: dict) -> None:
        data["text"]["chat_template"] = ARTIFACT_CHAT_TEMPLATE
        data["files"][ARTIFACT_CHAT_TEMPLATE] = digest

    edit_manifest(artifact, change)


# ---------------------------------------------------------------------------------------- rendering


def test_default_llava_template_renders_one_turn_as_the_documented_prompt() -> None:
    prompt = llava_format().render(user_turn(QUESTION))
    assert isinstance(prompt, ChatPrompt)
    assert prompt == f"USER: <image>\n{QUESTION} ASSISTANT:"
    assert [prompt[a:b] for a, b in prompt.user_spans] == [QUESTION] and prompt.query == QUESTION
    assert prompt.add_special_tokens  # the template writes no BOS: the tokenizer adds it


def test_multi_turn_messages_with_system_user_assistant() -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [IMAGE, text("What is it?")]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "And its colour?"}]
    prompt = llava_format().render(messages)
    assert prompt == "Be brief. USER: <image>\nWhat is it? ASSISTANT: A cat. USER: And its colour? ASSISTANT:"
    assert [prompt[a:b] for a, b in prompt.user_spans] == ["Be brief.", "What is it?", "A cat.", "And its colour?"]
    assert prompt.query == "What is it?\nAnd its colour?"  # the user turns: text relevance's words


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_rendering_matches_hugging_face(family: str) -> None:
    """The same text as transformers' own apply_chat_template renderer, on a multi-turn chat."""
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    from prunert.adapters.llava.host import LLAVA_CHAT_TEMPLATE
    from prunert.adapters.qwen2_5_vl.host import QWEN_CHAT_TEMPLATE

    template, placeholder = {"llava": (LLAVA_CHAT_TEMPLATE, "<image>"),
                             "qwen2_5_vl": (QWEN_CHAT_TEMPLATE, "<|vision_start|><|image_pad|><|vision_end|>")}[family]
    messages = [{"role": "system", "content": [text("You answer in French.")]},
                {"role": "user", "content": [IMAGE, text("  What is it? ")]},
                {"role": "assistant", "content": [text("Un chat.")]},
                {"role": "user", "content": [text("Its colour </s> <|im_end|>?")]}]
    ours = ChatFormat(template, "test", placeholder).render(messages)
    (theirs,), _ = chat_utils.render_jinja_template([messages], chat_template=template, add_generation_prompt=True)
    assert str(ours) == theirs


def test_qwen_default_template_is_the_checkpoints() -> None:
    from prunert.adapters.qwen2_5_vl.host import QWEN_CHAT_TEMPLATE
    from prunert.adapters.qwen2_5_vl.synthetic import CHAT_TEMPLATE

    assert QWEN_CHAT_TEMPLATE == CHAT_TEMPLATE


def test_text_spans_survive_a_template_that_trims() -> None:
    template = "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}[{{ c['text'] | trim }}]{% endif %}{% endfor %}{% endfor %}"
    prompt = ChatFormat(template, "test", "<image>").render(user_turn("  hi </s> there \n"))
    assert prompt == "<image>[hi </s> there]"
    assert [prompt[a:b] for a, b in prompt.user_spans] == ["hi </s> there"]


def test_a_template_that_rewrites_the_text_renders_as_hugging_face_without_spans() -> None:
    template = "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] | upper }}{% endif %}{% endfor %}{% endfor %}"
    prompt = ChatFormat(template, "test", "<image>").render(user_turn("hi"))
    assert prompt == "<image>HI" and prompt.user_spans == () and prompt.query == "hi"


BAD_MESSAGES = {
    "unknown role": ([{"role": "tool", "content": [IMAGE, text("x")]}], "messages[0]: role 'tool', expected one of system, user, assistant"),
    "part type": ([{"role": "user", "content": [IMAGE, {"type": "image_url", "image_url": {"url": "x"}}]}],
                  "messages[0].content[1]: type 'image_url', expected one of text, image"),
    "no image": ([{"role": "user", "content": "What is it?"}], "messages: no image part"),
    "two images": ([{"role": "user", "content": [IMAGE, text("a")]}, {"role": "user", "content": [IMAGE, text("b")]}],
                   "messages: 2 image parts; this artifact takes exactly 1 image per prompt"),
    "image from the assistant": ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [IMAGE]}],
                                 "messages[1].content[0]: an image in a assistant message"),
    "text not a string": ([{"role": "user", "content": [IMAGE, {"type": "text", "text": 3}]}], "'text' is int, expected a string"),
    "no content": ([{"role": "user"}], "messages[0]: expected an object with 'role' and 'content'"),
    "empty": ([], "expected a non-empty list"),
    "a string": ("hello", "expected a non-empty list"),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_messages_the_runtime_cannot_take_are_one_prompt_error(case: str) -> None:
    messages, needle = BAD_MESSAGES[case]
    with pytest.raises(PromptError) as info:
        llava_format().render(messages)
    assert needle in str(info.value) and "\n" not in str(info.value)


ESCAPES = [
    "{{ ''.__class__ }}<image>",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}<image>",
    "{{ cycler.__init__.__globals__.os.system('touch ESCAPED') }}<image>",
    "{{ raise_exception.__globals__ }}<image>",
    "{{ messages.append(1) }}<image>",
    "{% set ns = namespace(_hidden=1) %}<image>",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_template_escapes_are_refused_by_the_sandbox(source: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactError, match="refused by the sandbox"):
        ChatFormat(source, "test", "<image>").render(user_turn(QUESTION))
    assert not (tmp_path / "ESCAPED").exists()


def test_template_errors_are_clean() -> None:
    with pytest.raises(ArtifactError, match=r"chat template \(test\): not a valid Jinja template"):
        ChatFormat("{% for %}", "test", "<image>").check()
    with pytest.raises(PromptError, match="refuses them: Conversation roles must alternate"):
        ChatFormat("{{ raise_exception('Conversation roles must alternate') }}", "test", "<image>").render(user_turn("x"))
    with pytest.raises(ArtifactError, match="renders one image part as 0 image placeholders '<image>'"):
        ChatFormat("{% for m in messages %}{{ m['role'] }}{% endfor %}", "test", "<image>").render(user_turn("x"))


def test_checkpoint_template_sources_in_hugging_face_order(tmp_path: Path) -> None:
    assert checkpoint_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"},
                                                                                  {"name": "default", "template": "D"}]}))
    assert checkpoint_chat_template(tmp_path) == ("D", "tokenizer_config.json")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert checkpoint_chat_template(tmp_path) == ("J", "chat_template.json")
    (tmp_path / "chat_template.jinja").write_text("F")
    assert checkpoint_chat_template(tmp_path) == ("F", "chat_template.jinja")


# ---------------------------------------------------------------------------------------- the pipeline


def test_prompt_without_placeholder_gets_the_image_where_the_template_puts_it(tiny_pipeline) -> None:
    assert tiny_pipeline.tokenize([QUESTION]) == tiny_pipeline.tokenize([f"<image>\n{QUESTION}"])
    alone = tiny_pipeline.generate([PHOTO], [QUESTION], GREEDY)[0]
    explicit = tiny_pipeline.generate([PHOTO], [f"<image>\n{QUESTION}"], GREEDY)[0]
    assert alone.token_ids == explicit.token_ids
    np.testing.assert_array_equal(alone.kept_indices, explicit.kept_indices)  # the same content words: the same kept tokens


def test_chat_prompt_and_chat(tiny_pipeline) -> None:
    messages = [{"role": "user", "content": [IMAGE, text(QUESTION)]}]
    prompt = tiny_pipeline.chat_prompt(messages)
    assert prompt == f"USER: <image>\n{QUESTION} ASSISTANT:" and prompt.count("<image>") == 1
    answer = tiny_pipeline.chat(messages, PHOTO, GREEDY)
    assert answer.token_ids == tiny_pipeline.generate([PHOTO], [f"<image>\n{QUESTION}"], GREEDY)[0].token_ids


def test_special_tokens_typed_in_chat_messages_are_text(tiny_pipeline) -> None:
    text_spec = tiny_pipeline.manifest.text
    messages = [{"role": "user", "content": [IMAGE, text("A </s> B")]}, {"role": "assistant", "content": "C <s>"},
                {"role": "user", "content": "D <image>"}]
    (ids,) = tiny_pipeline.tokenize([tiny_pipeline.chat_prompt(messages)])
    assert ids.count(text_spec.image_token_id) == 1  # the template's; the typed <image> is text
    assert not set(text_spec.eos_token_ids) & set(ids)
    assert ids.count(text_spec.bos_token_id) == 1 and ids[0] == text_spec.bos_token_id


def test_old_manifest_without_chat_template_loads(artifact_copy: Path, edit_manifest) -> None:
    from prunert.runtime import Artifact, VLMPipeline

    assert load_manifest(artifact_copy).text.chat_template == ""  # llava-tiny has no template of its own
    edit_manifest(artifact_copy, lambda data: data["text"].pop("chat_template"))
    assert Artifact(artifact_copy).manifest.text.chat_template == ""
    assert VLMPipeline(artifact_copy).chat_prompt(user_turn(QUESTION)) == f"USER: <image>\n{QUESTION} ASSISTANT:"


@pytest.mark.parametrize("value, needle", [(5, "text.chat_template' is 5, expected str"),
                                           ("absent.jinja", "'text.chat_template' names 'absent.jinja', which 'files' does not list"),
                                           ("../outside.jinja", "climbs out with '..'")])
def test_manifest_chat_template_is_parsed_strictly(artifact_copy: Path, edit_manifest, value, needle: str) -> None:
    edit_manifest(artifact_copy, lambda data: data["text"].update(chat_template=value))
    with pytest.raises(ArtifactError) as info:
        load_manifest(artifact_copy)
    assert needle in str(info.value)


def test_artifact_template_is_used_and_hashed(artifact_copy: Path, edit_manifest, prunert_main, error_line) -> None:
    from prunert.runtime import VLMPipeline

    add_template(artifact_copy, "{% for m in messages %}Q: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                 "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} A:", edit_manifest)
    pipe = VLMPipeline(artifact_copy)
    assert pipe.chat_prompt(user_turn(QUESTION)) == f"Q: <image> {QUESTION} A:"
    assert pipe.tokenize([QUESTION])[0] == pipe.artifact.tokenizer.encode(f"Q: <image> {QUESTION} A:").ids
    (artifact_copy / ARTIFACT_CHAT_TEMPLATE).write_text("{{ messages }}<image>")  # changed after export
    code, out, err = prunert_main("run", artifact_copy, "--image", PHOTO, "--prompt", QUESTION)
    assert code == 2 and out == ""
    error_line(err, f"file '{ARTIFACT_CHAT_TEMPLATE}' sha256", "does not match")


def test_run_with_an_escaping_template_is_one_error_line(artifact_copy: Path, edit_manifest, prunert_main, error_line) -> None:
    add_template(artifact_copy, ESCAPES[1], edit_manifest)
    code, out, err = prunert_main("run", artifact_copy, "--image", PHOTO, "--prompt", QUESTION, "--max-new-tokens", "2")
    assert code == 2 and out == ""
    error_line(err, ARTIFACT_CHAT_TEMPLATE, "refused by the sandbox", "__class__")
    code, _, err = prunert_main("run", artifact_copy, "--image", PHOTO, "--prompt", f"<image> {QUESTION}", "--max-new-tokens", "2")
    assert code == 0, err  # an explicit placeholder does not render the template


# ---------------------------------------------------------------------------------------- export and the three families


def _export(model: str, out: Path, budget: int) -> Path:
    from prunert.export.pipeline import export_artifact

    export_artifact(model, out, BudgetConfig(budget=budget), ExportConfig(max_prompt_tokens=96, max_new_tokens=8), log=lambda message: None)
    return out


@pytest.fixture(scope="module")
def family_artifacts(tiny_artifact: Path, next_tiny_artifact: Path, qwen_tiny_artifact: Path) -> dict[str, Path]:
    """The session's tiny artifact of each family (read-only)."""
    return {"llava": tiny_artifact, "llava_next": next_tiny_artifact, "qwen2_5_vl": qwen_tiny_artifact}


EXPLICIT = {"llava": "<image>\n", "llava_next": "<image>\n", "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


@pytest.mark.parametrize("family", sorted(EXPLICIT))
def test_run_without_placeholder_on_every_family(family_artifacts, family: str, prunert_main) -> None:
    from prunert.runtime import VLMPipeline

    artifact = family_artifacts[family]
    pipe = VLMPipeline(artifact)
    assert pipe.tokenize([QUESTION]) == pipe.tokenize([EXPLICIT[family] + QUESTION])
    code, out, err = prunert_main("run", artifact, "--image", PHOTO, "--prompt", QUESTION, "--max-new-tokens", "2")
    assert code == 0, err
    assert "visual tokens" in err


def test_export_stores_the_checkpoints_template(family_artifacts) -> None:
    from prunert.adapters.qwen2_5_vl.synthetic import CHAT_TEMPLATE, synthetic_checkpoint

    qwen = load_manifest(family_artifacts["qwen2_5_vl"])
    assert qwen.text.chat_template == ARTIFACT_CHAT_TEMPLATE and ARTIFACT_CHAT_TEMPLATE in qwen.files
    assert (family_artifacts["qwen2_5_vl"] / ARTIFACT_CHAT_TEMPLATE).read_text() == CHAT_TEMPLATE
    assert (synthetic_checkpoint("qwen2.5-vl-tiny") / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    for family in ("llava", "llava_next"):  # their synthetic checkpoints have none: the family's default at run time
        assert load_manifest(family_artifacts[family]).text.chat_template == ""


def test_export_uses_a_template_from_tokenizer_config(tiny_checkpoint: Path, tmp_path: Path, prunert_main) -> None:
    from prunert.runtime import VLMPipeline

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    template = ("{% for m in messages %}{{ m['role'] | upper }}> {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %} | {% endfor %}{% if add_generation_prompt %}BOT>{% endif %}")
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    artifact = _export(str(checkpoint), tmp_path / "artifact", 16)
    assert load_manifest(artifact).text.chat_template == ARTIFACT_CHAT_TEMPLATE
    assert (artifact / ARTIFACT_CHAT_TEMPLATE).read_text() == template
    pipe = VLMPipeline(artifact)
    expected = f"USER> <image> {QUESTION} | BOT>"
    assert pipe.chat_prompt(user_turn(QUESTION)) == expected
    assert pipe.tokenize([QUESTION])[0] == pipe.artifact.tokenizer.encode(expected).ids
    code, _, err = prunert_main("run", artifact, "--image", PHOTO, "--prompt", QUESTION, "--max-new-tokens", "2")
    assert code == 0, err


def test_a_chat_prompt_goes_through_the_serving_engine_as_rendered(tiny_pipeline) -> None:
    """The serving engine takes chat_prompt's result as its Request.prompt: the same answer as VLMPipeline.chat."""
    import threading

    from prunert.serving.config import EngineConfig
    from prunert.serving.engine import Engine, Request

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [IMAGE, text(f"{QUESTION} </s>")]}]
    events, done = [], threading.Event()

    def deliver(event) -> None:
        events.append(event)
        if event.finish is not None:
            done.set()

    engine = Engine(tiny_pipeline, EngineConfig()).start()
    try:
        engine.submit(Request(PHOTO, tiny_pipeline.chat_prompt(messages), GREEDY), deliver)
        assert done.wait(60)
    finally:
        engine.shutdown(0)
    assert events[-1].finish in ("stop", "length"), events[-1]
    assert "".join(event.text for event in events) == tiny_pipeline.chat(messages, PHOTO, GREEDY).text
