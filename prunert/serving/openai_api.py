"""OpenAI's chat-completions protocol, without a web framework: a request body -> a ChatCall (messages for the
artifact's chat template, its images decoded, the generation settings), ApiError -> OpenAI-shaped error JSON,
and the response and stream-chunk objects. prunert.serving.http_server puts it on the wire.

Policy (https://platform.openai.com/docs/api-reference/chat/create):
- unknown fields are ignored, as OpenAI does; known fields prunert does not implement (UNSUPPORTED) are a 400 naming
  them, unless they hold their no-op value (`n: 1`, `logprobs: false`, `tools: []`, ...);
- an image is a `data:image/...;base64,` URI, or a local file only under --allow-image-dir; http(s) URLs are never
  fetched; a request holds one image_url part per image, as many as the artifact's family takes in one prompt
  (LLaVA-1.5: one; LLaVA-NeXT and Qwen2.5-VL: several, each where its part stands in the chat template);
- temperature > 0 without a seed samples with a fresh seed (reported in the X-Prunert-Seed header).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from prunert.config import GenerationConfig, seed_for
from prunert.errors import ConfigError, PrunertError
from prunert.runtime.image import decode_image_bytes

MAX_STOP = 4  # OpenAI's limit on `stop` strings
TEXT_PARTS, IMAGE_PARTS = ("text",), ("image_url",)
# Known fields prunert does not implement -> the values that mean "not used" (accepted as if absent).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "suffix": ("",),
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "logit_bias": ({},), "presence_penalty": (0,), "frequency_penalty": (0,),
    "audio": (), "modalities": (["text"],), "prediction": (), "web_search_options": (), "reasoning_effort": (),
}


class ApiError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error object (message, type, param, code)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, param, code)


@dataclass(frozen=True)
class ImageSource:
    """Where request images may come from (HttpConfig): local files only under allow_dir; files up to max_bytes; at
    most max_count images a request (the artifact's host max_images_per_prompt; None: any number)."""

    allow_dir: Path | None = None
    max_bytes: int = 20 << 20
    max_count: int | None = None


@dataclass(frozen=True)
class ChatCall:
    """A parsed request: `messages` as VLMPipeline.chat_prompt takes them (image parts as {"type": "image"})."""

    messages: tuple[dict[str, Any], ...]
    images: tuple[Any, ...]  # the RGB images (PIL.Image), one per image_url part, in order
    config: GenerationConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with `usage`
    seed: int  # the seed the request samples with (drawn when temperature > 0 and none was given)


def parse_chat(body: bytes, default_max_tokens: int, images: ImageSource = ImageSource()) -> ChatCall:
    """A request body -> ChatCall; ApiError (400) naming the field for anything malformed. Decodes the images (call it
    off the event loop)."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(request, dict):
        raise bad_request(f"the request body is a JSON {type(request).__name__}, expected an object", code="invalid_json")
    _refuse_unsupported(request)
    stream = _typed(request, "stream", bool, False)
    options = _typed(request, "stream_options", dict, {})
    include_usage = _typed(options, "include_usage", bool, False, "stream_options.include_usage")
    messages, image_urls = _messages(request.get("messages"))
    _check_image_count(len(image_urls), images.max_count)
    config, seed = _generation(request, default_max_tokens)
    decoded = tuple(load_request_image(url, param, images) for param, url in image_urls)
    return ChatCall(tuple(messages), decoded, config, _stop(request.get("stop")), stream, include_usage, seed)


def _check_image_count(count: int, most: int | None) -> None:
    """A 400 (code image_count) unless 1 <= count <= most (None: no upper limit), before any image is decoded."""
    if count and (most is None or count <= most):
        return
    expected = ("exactly one (this artifact's family takes one image per request)" if most == 1 else
                "at least one" if most is None else f"1 to {most} (this artifact's family takes at most {most} per request)")
    raise bad_request(f"messages: {count} images, expected {expected}" + ("" if count else "; add an image_url content part"),
                      "messages", "image_count")


def _refuse_unsupported(request: dict[str, Any]) -> None:
    used = sorted(name for name, neutral in UNSUPPORTED.items()
                  if request.get(name) is not None and not any(_same(request[name], value) for value in neutral))
    if used:
        raise bad_request(f"unsupported field{'s' if len(used) > 1 else ''}: {', '.join(used)} (prunert serves one choice of "
                          "plain text: n=1, no tools, logprobs, response formats or penalties)", used[0], "unsupported_field")


def _same(value: Any, neutral: Any) -> bool:
    """JSON equality where true is not 1 (`n: true` is not `n: 1`) but 0.0 is 0."""
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


def _typed(source: dict[str, Any], key: str, kind: type, default: Any, param: str | None = None) -> Any:
    """source[key] if it is a `kind` (None / absent: default), else a 400 naming the field."""
    value = source.get(key)
    if value is None:
        return default
    numeric = kind in (int, float)
    ok = isinstance(value, (int, float) if kind is float else kind) and not (numeric and isinstance(value, bool))
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a number", dict: "an object", str: "a string"}[kind]
        raise bad_request(f"{param or key}: got {json.dumps(value)[:40]} ({_json_type(value)}), expected {expected}", param or key)
    return value


def _json_type(value: Any) -> str:
    return {bool: "a boolean", str: "a string", int: "a number", float: "a number", list: "an array", dict: "an object"}.get(type(value), "null")


def _messages(value: Any) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """OpenAI messages -> chat_prompt's messages, and each image part's (param, url) in order."""
    if not isinstance(value, list) or not value:
        raise bad_request("messages: expected a non-empty array of {role, content} objects", "messages")
    messages, images = [], []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where}: got {_json_type(message)}, expected an object with role and content", where)
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise bad_request(f"{where}.role: expected a string (system, user or assistant)", f"{where}.role")
        if isinstance(content, list):
            content = [_part(part, f"{where}.content[{j}]", images) for j, part in enumerate(content)]
        elif content is not None and not isinstance(content, str):
            raise bad_request(f"{where}.content: got {_json_type(content)}, expected a string or an array of content parts",
                              f"{where}.content")
        messages.append({"role": role, "content": content if content is not None else ""})
    return messages, images


def _part(part: Any, where: str, images: list[tuple[str, str]]) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in TEXT_PARTS:
        return {"type": "text", "text": _typed(part, "text", str, "", f"{where}.text")}
    if kind in IMAGE_PARTS:
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise bad_request(f"{where}.image_url.url: expected a string (a data:image/...;base64, URI)", f"{where}.image_url")
        images.append((f"{where}.image_url", url))
        return {"type": "image"}
    got = f"type {json.dumps(kind)}" if isinstance(part, dict) else _json_type(part)
    raise bad_request(f"{where}: {got} is not supported, expected a content part of type text or image_url", where)


def _generation(request: dict[str, Any], default_max_tokens: int) -> tuple[GenerationConfig, int]:
    """max_completion_tokens (or the older max_tokens), temperature, top_p, seed -> (GenerationConfig, the seed)."""
    limits = {name: _typed(request, name, int, None) for name in ("max_completion_tokens", "max_tokens")}
    for name, value in limits.items():
        if value is not None and value < 1:
            raise bad_request(f"{name}: got {value}, expected >= 1", name)
    max_tokens = limits["max_completion_tokens"] or limits["max_tokens"]
    temperature = float(_typed(request, "temperature", float, 0.0))
    top_p = float(_typed(request, "top_p", float, 1.0))
    seed = seed_for(_typed(request, "seed", int, None), temperature)  # a fresh seed per sampled request without one
    try:
        return GenerationConfig(max_new_tokens=max_tokens or default_max_tokens, temperature=temperature, top_p=top_p, seed=seed), seed
    except ConfigError as exc:  # "temperature: got -1.0, expected >= 0", ...
        raise bad_request(str(exc), str(exc).split(":")[0]) from None


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP:
        raise bad_request(f"stop: expected a string or an array of at most {MAX_STOP} strings", "stop")
    return tuple(s for s in stops if s)


def load_request_image(url: str, param: str, source: ImageSource) -> Any:
    """An image_url -> an RGB image: a data: URI, or a local file under source.allow_dir; never the network."""
    scheme = urlparse(url).scheme.lower() if ":" in url[:12] else ""
    if scheme in ("http", "https"):
        raise bad_request(f"{param}: {url[:60]!r} is a network URL; this server makes no network fetches, ever: send the image "
                          "inline as a data:image/...;base64, URI", param, "network_url_refused")
    if scheme == "data":
        return _data_uri_image(url, param)
    if scheme not in ("", "file") and len(scheme) > 1:  # "C:\..." is a path
        raise bad_request(f"{param}: URL scheme {scheme!r} is not supported, expected a data:image/...;base64, URI", param)
    return _local_image(unquote(urlparse(url).path) if scheme == "file" else url, param, source)


def _data_uri_image(url: str, param: str) -> Any:
    header, comma, payload = url[5:].partition(",")
    media, *flags = (part.strip().lower() for part in header.split(";"))  # RFC 2397: case-insensitive
    if not comma or not media.startswith("image/") or "base64" not in flags:
        raise bad_request(f"{param}: a data URI of {media or 'no media type'!r}{'' if 'base64' in flags else ', not base64'}, "
                          "expected data:image/...;base64,<data>", param, "invalid_image")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{param}: the data URI's base64 is invalid or truncated ({exc})", param, "invalid_image") from None
    return _decoded(data, param)


def _local_image(path: str, param: str, source: ImageSource) -> Any:
    if source.allow_dir is None:
        raise bad_request(f"{param}: local image paths are disabled (the server was started without --allow-image-dir); "
                          "send the image as a data:image/...;base64, URI", param, "local_path_refused")
    root = Path(source.allow_dir).resolve()
    target = (root / path).resolve()  # an absolute path replaces root; links are followed before the check
    if not target.is_relative_to(root):
        raise bad_request(f"{param}: {path!r} is outside --allow-image-dir", param, "local_path_refused")
    if not target.is_file():
        raise bad_request(f"{param}: {path!r}: no such image file under --allow-image-dir", param, "invalid_image")
    if target.stat().st_size > source.max_bytes:
        raise bad_request(f"{param}: {path!r} is over {source.max_bytes:,} bytes", param, "invalid_image")
    return _decoded(target.read_bytes(), param)


def _decoded(data: bytes, param: str) -> Any:
    try:
        return decode_image_bytes(data, param)
    except PrunertError as exc:  # ImageError: undecodable, not an image, a decompression bomb, too small
        raise bad_request(str(exc), param, "invalid_image") from None


# ---- responses ----------------------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_json(usage: Any) -> dict[str, Any]:
    """engine.Usage -> OpenAI's usage (prompt tokens count the K kept visual tokens) + prunert's visual_tokens."""
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "visual_tokens": {"kept": usage.visual_kept, "total": usage.visual_total}}


def completion(cid: str, model: str, text: str, finish: str, usage: Any) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}],
            "usage": usage_json(usage)}


def chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> dict[str, Any]:
    """One stream chunk; with `usage` (stream_options.include_usage): the last one, with no choices."""
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage_json(usage)
    return out


def sse(data: dict[str, Any] | str) -> bytes:
    """A server-sent event: `data: <json>` (or the literal [DONE]) and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def model_card(pipeline: Any) -> dict[str, Any]:
    """GET /v1/models' one entry: the artifact (its directory's name is the model id) with family, method, K and precision."""
    manifest = pipeline.manifest
    return {"id": Path(pipeline.artifact.directory).name, "object": "model", "created": 0, "owned_by": "prunert",
            "family": manifest.source.family, "method": manifest.budget.method, "K": manifest.budget.budget,
            "N": manifest.budget.num_visual_tokens, "precision": pipeline.precision.label, "backend": pipeline.backend,
            "max_batch": manifest.text.max_batch}
