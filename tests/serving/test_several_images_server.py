"""`prunert serve` with several image_url parts in one request (LLaVA-NeXT: its tiny artifact, started for real on
127.0.0.1 and asked with the official `openai` client): the answer equals VLMPipeline.chat's with the same images,
usage counts every image's kept tokens; a request of more images than the exported sequence holds is a 400."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from prunert.config import GenerationConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PHOTOS = [REPO / "examples" / "images" / f"{name}.jpg" for name in ("chelsea", "astronaut")]
QUESTION = "Which picture shows the cat?"
TIMEOUT = 60
K = 12


def _content(urls: list[str], question: str = QUESTION) -> list[dict]:
    """An image_url part per url, the question between the two (Qwen-style placement; LLaVA's template puts images first)."""
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [parts[0], {"type": "text", "text": question}, *parts[1:]]


def test_two_image_parts_answer_as_the_pipeline(start_server_over, data_uri, next_tiny_artifact: Path) -> None:
    from prunert.runtime import VLMPipeline

    server = start_server_over(VLMPipeline(next_tiny_artifact))
    reference = VLMPipeline(next_tiny_artifact)
    content = _content([data_uri(photo) for photo in PHOTOS])
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0) as client:
        response = client.chat.completions.create(model="next", messages=[{"role": "user", "content": content}], max_tokens=8)
    parts = [{"type": "image"} if part["type"] == "image_url" else part for part in content]
    expected = reference.chat([{"role": "user", "content": parts}], PHOTOS, GenerationConfig(max_new_tokens=8))
    assert response.choices[0].message.content == expected.text
    assert response.usage.model_extra["visual_tokens"] == {"kept": 2 * K, "total": sum(expected.tokens_per_image)}
    prompt = reference.chat_prompt([{"role": "user", "content": parts}])
    assert response.usage.prompt_tokens == len(reference.tokenize([prompt], [2])[0]) - 2 + 2 * K


def test_more_images_than_the_sequence_holds_is_a_400(start_server_over, data_uri, next_tiny_artifact: Path) -> None:
    from prunert.runtime import VLMPipeline

    pipeline = VLMPipeline(next_tiny_artifact)
    server = start_server_over(pipeline)
    images = pipeline.manifest.text.max_sequence // K + 1
    body = {"model": "next", "messages": [{"role": "user", "content": _content([data_uri(PHOTOS[0])] * images)}]}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert f"{images} images of K={K} visual tokens" in error["message"] and "\n" not in error["message"]
