"""Chat prompts (no torch, no transformers): OpenAI-shaped messages rendered with the checkpoint's own chat template,
or the family's documented default where the checkpoint has none, as Hugging Face's `apply_chat_template` does.

Templates are Jinja2, rendered in `jinja2.sandbox.ImmutableSandboxedEnvironment` with HF's settings (trim_blocks,
lstrip_blocks, loopcontrols, `{% generation %}` blocks, `raise_exception`, `tojson`, `strftime_now`, `dict`, a
`namespace` that refuses underscore names) and HF's variables (messages, add_generation_prompt, the tokenizer's
special tokens). A chat template is code from a checkpoint: the sandbox keeps it away from Python internals
(`''.__class__` is an ArtifactError, not an attribute).

Messages: `{"role": "system" | "user" | "assistant", "content": str | [{"type": "text", "text": str}, {"type": "image"}]}`.
Content is passed to the template as a list of parts (string content as one text part), the layout VLM templates
expect. The rendering is a `ChatPrompt` (prunert.runtime.text): where each message text lies in it, so special tokens
a user types stay text, as in a plain prompt.

Where the text lies: the template is rendered twice, once with each text replaced by a marker (its surrounding
whitespace kept, so `| trim` acts the same) and once as is. Filling the markers in gives the rendering and the
spans; when a template changes the text in other ways and the two differ, the plain rendering is used without
spans (special tokens in it are then parsed as HF would).
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from prunert.errors import ArtifactError, BackendUnavailableError, ModelSourceError, PromptError
from prunert.runtime.text import ChatPrompt, Span

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image")
ARTIFACT_CHAT_TEMPLATE = "chat_template.jinja"  # the file export writes (manifest text.chat_template names it)
# Where a Hugging Face checkpoint keeps its chat template, in the order transformers prefers them (the processor's
# multimodal template before the tokenizer's).
CHECKPOINT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
MIN_JINJA = (3, 1, 6)  # transformers' floor: older Jinja2 has known sandbox escapes
_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use characters around a text's index


def user_turn(prompt: str, images: int = 1) -> list[dict[str, Any]]:
    """One user message: the image parts (`images` of them), then `prompt` (how `run` places the images when a prompt
    has no placeholder; the template then puts each where its chat format puts images)."""
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": prompt}]}]


@dataclass(frozen=True)
class ChatFormat:
    """One artifact's chat format.

    template:        Jinja source (HF chat-template conventions).
    origin:          where it came from, for messages ("artifact 'A' chat_template.jinja", "the llava family's default").
    placeholder:     the manifest's image placeholder: what the template must render for each image part.
    special_tokens:  template variables as HF passes them (bos_token, eos_token, pad_token, image_token), as text.
    max_images:      the most image parts one conversation may hold (the host's max_images_per_prompt; None: any).
    """

    template: str
    origin: str
    placeholder: str
    special_tokens: tuple[tuple[str, str], ...] = ()
    max_images: int | None = 1

    def check(self) -> None:
        """Compile now (a syntax error is an ArtifactError naming the origin)."""
        _compiled(self.template, self.origin)

    def render(self, messages: Sequence[Mapping[str, Any]]) -> ChatPrompt:
        """messages -> the prompt text with one image placeholder for each image part, ending with the generation
        prompt. PromptError for messages the runtime cannot take (unknown role or part type, no image, more than
        max_images); ArtifactError where the template fails its own contract (unsafe, or not one placeholder per image)."""
        conversation, texts = normalize_messages(messages, self.max_images)
        images = sum(part["type"] == "image" for message in conversation for part in message["content"])
        marks = [_marker(index, text) for index, text in enumerate(texts)]
        marked = self._render(_with_texts(conversation, marks))
        plain = self._render(conversation)
        count = marked.count(self.placeholder)
        if count != images:
            parts = "one image part" if images == 1 else f"{images} image parts"
            raise ArtifactError(f"chat template ({self.origin}): renders {parts} as {count} image placeholders "
                                f"{self.placeholder!r}, expected {images}")
        filled = _fill(marked, texts)
        bos = dict(self.special_tokens).get("bos_token")
        query = "\n".join(text for text, role in zip(texts, _text_roles(conversation)) if role == "user")
        if filled is None or filled[0] != plain:  # the template changes the text itself: no spans
            text, spans = plain, ()
        else:
            text, spans = filled
        return ChatPrompt(text, spans, query, add_special_tokens=not (bos and text.startswith(bos)), images=images)

    def _render(self, conversation: list[dict[str, Any]]) -> str:
        import jinja2

        template = _compiled(self.template, self.origin)
        try:
            return template.render(messages=conversation, add_generation_prompt=True, tools=None, documents=None,
                                   **dict(self.special_tokens))
        except jinja2.exceptions.SecurityError as exc:
            raise ArtifactError(f"chat template ({self.origin}): refused by the sandbox: {_line(exc)}") from None
        except jinja2.exceptions.TemplateError as exc:  # raise_exception(...) of the template: the messages' fault
            raise PromptError(f"messages: the chat template ({self.origin}) refuses them: {_line(exc)}") from None
        except Exception as exc:  # a template bug on these messages (TypeError, ...): never a traceback
            raise PromptError(f"messages: the chat template ({self.origin}) cannot render them: {type(exc).__name__}: {_line(exc)}") from None


def normalize_messages(messages: Any, max_images: int | None = 1) -> tuple[list[dict[str, Any]], list[str]]:
    """Check OpenAI-shaped messages -> (a fresh copy with every content a list of parts, the text of every text part in
    order). Image parts become {"type": "image"}: at least one, at most max_images (None: any). PromptError names the
    message and part."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise PromptError("messages: expected a non-empty list of {'role': ..., 'content': ...} objects")
    conversation, texts, images = [], [], 0
    for at, message in enumerate(messages):
        where = f"messages[{at}]"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise PromptError(f"{where}: expected an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise PromptError(f"{where}: role {role!r}, expected one of {', '.join(ROLES)}")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if isinstance(parts, (str, bytes, Mapping)) or not isinstance(parts, Sequence):
            raise PromptError(f"{where}: content is {type(content).__name__}, expected a string or a list of parts")
        normalized = []
        for index, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind not in PART_TYPES:
                raise PromptError(f"{where}.content[{index}]: type {kind!r}, expected one of {', '.join(PART_TYPES)}")
            if kind == "image":
                images += 1
                if role != "user":
                    raise PromptError(f"{where}.content[{index}]: an image in a {role} message; expected images in user messages")
                normalized.append({"type": "image"})
                continue
            if not isinstance(part.get("text"), str):
                raise PromptError(f"{where}.content[{index}]: 'text' is {type(part.get('text')).__name__}, expected a string")
            texts.append(part["text"])
            normalized.append({"type": "text", "text": part["text"]})
        conversation.append({"role": role, "content": normalized})
    if not images or (max_images is not None and images > max_images):
        found = "no image part" if not images else f"{images} image parts"
        takes = ("exactly 1 image per prompt" if max_images == 1 else "at least 1 image per prompt" if max_images is None
                 else f"1 to {max_images} images per prompt")
        raise PromptError(f"messages: {found}; this artifact takes {takes} (a {{'type': 'image'}} content part in a user "
                          "message, for each image)")
    return conversation, texts


def _text_roles(conversation: list[dict[str, Any]]) -> list[str]:
    return [message["role"] for message in conversation for part in message["content"] if part["type"] == "text"]


def _marker(index: int, text: str) -> str:
    """The text's stand-in: its leading and trailing whitespace around a private-use marker of its index."""
    core = text.strip()
    head = text[: len(text) - len(text.lstrip())]
    tail = text[len(text.rstrip()) :] if core else ""
    return f"{head}\ue000{index}\ue001{tail}"


def _with_texts(conversation: list[dict[str, Any]], texts: list[str]) -> list[dict[str, Any]]:
    replacements = iter(texts)
    return [{"role": m["role"], "content": [{**p, "text": next(replacements)} if p["type"] == "text" else dict(p) for p in m["content"]]}
            for m in conversation]


def _fill(marked: str, texts: list[str]) -> tuple[str, tuple[Span, ...]] | None:
    """The marked rendering with each marker replaced by its text (stripped: the whitespace stayed around the marker)
    -> (text, the texts' spans in order of appearance); None if a marker is missing or repeated."""
    found = [int(m.group(1)) for m in _MARK.finditer(marked)]
    if sorted(found) != list(range(len(texts))):
        return None
    pieces, spans, length, last = [], [], 0, 0
    for match in _MARK.finditer(marked):
        before, core = marked[last : match.start()], texts[int(match.group(1))].strip()
        pieces += [before, core]
        length += len(before)
        spans.append((length, length + len(core)))
        length += len(core)
        last = match.end()
    pieces.append(marked[last:])
    return "".join(pieces), tuple(spans)


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@lru_cache(maxsize=16)
def _compiled(source: str, origin: str) -> Any:
    """The template compiled in HF's sandboxed environment (cached per source, as transformers does)."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.nodes
        import jinja2.utils
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise BackendUnavailableError("chat templates need jinja2 (pip install 'jinja2>=3.1.6')") from None
    if tuple(int(part) for part in re.findall(r"\d+", jinja2.__version__)[:3]) < MIN_JINJA:
        raise BackendUnavailableError(f"chat templates need jinja2>=3.1.6 (older versions have sandbox escapes); found {jinja2.__version__}")

    class Sandbox(ImmutableSandboxedEnvironment):
        """An unsafe attribute (`''.__class__`, `list.append`) raises at once; Jinja's own sandbox gives an undefined
        value that renders as "" and raises only when used further."""

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    environment = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_generation_extension(jinja2), "jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                               namespace=_namespace_class(jinja2))
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateError as exc:  # TemplateSyntaxError and the like
        raise ArtifactError(f"chat template ({origin}): not a valid Jinja template: {_line(exc)}") from None


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    """HF's tojson: plain json.dumps (Jinja's own escapes HTML characters)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` in a template without the type itself (no attribute access to it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _generation_extension(jinja2: Any) -> type:
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask tag): renders its body."""

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    return Generation


def _namespace_class(jinja2: Any) -> type:
    """Jinja's namespace, refusing underscore-prefixed names (HF's TemplateNamespace)."""

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute {name!r}: underscore-prefixed names are refused")

    return Namespace


# ---- where a template comes from ------------------------------------------------------------------------------------


def checkpoint_chat_template(model_dir: Path) -> tuple[str, str] | None:
    """The chat template of a Hugging Face checkpoint directory -> (source, the file it came from), or None: the first
    of chat_template.jinja, chat_template.json {"chat_template": ...}, tokenizer_config.json "chat_template" (a string,
    or a list of {"name", "template"} whose "default" is used). ModelSourceError for a file that is unreadable."""
    for name in CHECKPOINT_TEMPLATE_FILES:
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".jinja"):
                return path.read_text(encoding="utf-8"), name
            value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (UnicodeDecodeError, ValueError, OSError, AttributeError) as exc:
            raise ModelSourceError(f"checkpoint '{model_dir}': cannot read the chat template in {name}: {_line(exc)}") from None
        if isinstance(value, list):  # named templates
            value = next((t.get("template") for t in value if isinstance(t, Mapping) and t.get("name") == "default"), None)
        if isinstance(value, str) and value.strip():
            return value, name
    return None


_FORMATS: "weakref.WeakKeyDictionary[Any, ChatFormat]" = weakref.WeakKeyDictionary()


def chat_format(artifact: Any) -> ChatFormat:
    """The chat format of an opened prunert.runtime.Artifact (cached per artifact): the template its manifest lists
    (text.chat_template), else its family's default (HostAdapter.default_chat_template)."""
    cached = _FORMATS.get(artifact)
    if cached is not None:
        return cached
    text = artifact.manifest.text
    if text.chat_template:
        try:
            source = artifact.path(text.chat_template).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            raise ArtifactError(f"artifact '{artifact.directory}': cannot read {text.chat_template}: {_line(exc)}") from None
        origin = f"artifact '{artifact.directory}' {text.chat_template}"
    else:
        source, origin = artifact.host.default_chat_template(), f"the {artifact.manifest.source.family} family's default"
    tokenizer = artifact.tokenizer
    ids = {"bos_token": text.bos_token_id, "eos_token": text.eos_token_ids[0] if text.eos_token_ids else None, "pad_token": text.pad_token_id}
    tokens = {name: tokenizer.id_to_token(token_id) for name, token_id in ids.items() if token_id is not None}
    tokens["image_token"] = text.image_token
    result = ChatFormat(source, origin, text.placeholder, tuple((k, v) for k, v in tokens.items() if v is not None),
                        artifact.host.max_images_per_prompt)
    result.check()
    _FORMATS[artifact] = result
    return result
