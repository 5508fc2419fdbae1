"""Each wire API of the gateway over the real local model (llama.cpp child, SmolLM2): text and embeddings."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from netfly.providers.local import Local, is_available

from .conftest import TOKEN

pytestmark = [pytest.mark.local, pytest.mark.skipif(not is_available(), reason="the local model is not installed")]
HI: list[Any] = [{"role": "user", "content": "Say hello in one short sentence."}]


async def test_chat_responses_and_messages_answer_text(gateway: Any) -> None:
    gw = await gateway(Local)
    async with gw.client(timeout=120) as client:
        chat = await client.chat.completions.create(model=None, messages=HI, max_tokens=16)  # type: ignore[arg-type]
        whole = await client.responses.create(model="", input="Say hello.", max_output_tokens=16)
        async with client.responses.stream(model="", input="Say hello.", max_output_tokens=16) as stream:
            events = [event async for event in stream]
    assert chat.choices[0].message.content
    assert whole.output_text
    # Cut at 16 tokens, the answer ends as OpenAI's does: response.incomplete (max_output_tokens)
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta")
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=TOKEN, max_retries=0, timeout=120) as claude:
        message = await claude.messages.create(model="", max_tokens=16, messages=HI)
        async with claude.messages.stream(model="", max_tokens=16, messages=HI) as stream:
            texts = [text async for text in stream.text_stream]
    assert message.content[0].type == "text" and message.content[0].text
    assert "".join(texts)


async def test_embeddings_from_the_local_model_are_one_vector_per_input(gateway: Any) -> None:
    gw = await gateway(Local)
    async with gw.client(timeout=120) as client:
        one = await client.embeddings.create(model="", input="The sky is blue.")
        several = await client.embeddings.create(model="", input=["a cat", "a much longer sentence about dogs"])
    vectors = [one.data[0].embedding] + [d.embedding for d in several.data]
    assert all(isinstance(x, float) for x in vectors[0])  # flat, not one vector per token
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 16
