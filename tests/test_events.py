"""The accumulator assembles typed events the way openai-python assembles streamed chunks."""

from __future__ import annotations

from netfly.events import ChatAccumulator, ChoiceDelta, ChunkMeta, ToolCall, ToolCallDelta, Usage


def test_two_parallel_tool_calls_are_assembled_by_index() -> None:
    acc = ChatAccumulator()
    acc.add(ChunkMeta(id="c1", model="m", created=5, system_fingerprint="fp"))
    acc.add(ChoiceDelta(role="assistant", tool_calls=(ToolCallDelta(0, id="call_a", type="function", name="get"),)))
    acc.add(ChoiceDelta(tool_calls=(ToolCallDelta(0, arguments='{"ci'),)))
    acc.add(ChoiceDelta(tool_calls=(ToolCallDelta(1, id="call_b", type="function", name="put", arguments=""),)))
    acc.add(ChoiceDelta(tool_calls=(ToolCallDelta(0, arguments='ty": "Paris"}'), ToolCallDelta(1, arguments="{}"))))
    acc.add(ChoiceDelta(finish_reason="tool_calls"))
    acc.add(Usage({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}))
    result = acc.result()
    assert result.tool_calls == [
        ToolCall(id="call_a", name="get", arguments='{"city": "Paris"}'),
        ToolCall(id="call_b", name="put", arguments="{}"),
    ]
    assert result.tool_calls[0].to_dict() == {
        "id": "call_a", "type": "function", "function": {"name": "get", "arguments": '{"city": "Paris"}'}
    }
    assert (result.text, result.finish_reason, result.id, result.model) == ("", "tool_calls", "c1", "m")
    assert (result.created, result.system_fingerprint) == (5, "fp")
    assert result.usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert result.choices == []  # one choice: the top-level fields say it all


def test_reasoning_text_refusal_logprobs_and_two_choices() -> None:
    acc = ChatAccumulator()
    acc.add(ChoiceDelta(reasoning="think", reasoning_field="reasoning"))
    acc.add(ChoiceDelta(reasoning="ing"))
    acc.add_text("Hel")
    acc.add(ChoiceDelta(text="lo", logprobs={"content": [{"token": "lo"}]}))
    acc.add(ChoiceDelta(text="!", logprobs={"content": [{"token": "!"}]}))
    acc.add(ChoiceDelta(index=1, refusal="No"))
    acc.add(ChoiceDelta(index=1, refusal=".", finish_reason="stop"))
    result = acc.result(malformed_chunks=2)
    assert (result.text, result.reasoning, result.refusal) == ("Hello!", "thinking", None)
    assert result.logprobs == {"content": [{"token": "lo"}, {"token": "!"}]}
    assert [c.index for c in result.choices] == [0, 1]
    assert result.choices[1].refusal == "No."
    assert result.choices[1].finish_reason == "stop"
    assert result.malformed_chunks == 2
    assert str(result) == "Hello!"


def test_has_output_counts_every_kind_of_output_and_nothing_else() -> None:
    assert not ChoiceDelta(role="assistant").has_output
    assert not ChoiceDelta(finish_reason="stop").has_output
    assert not ChoiceDelta(text="").has_output
    for delta in (
        ChoiceDelta(text="x"), ChoiceDelta(reasoning="x"), ChoiceDelta(refusal="x"),
        ChoiceDelta(tool_calls=(ToolCallDelta(0, name="f"),)),
    ):
        assert delta.has_output


def test_usage_fields_are_read_as_integers_only() -> None:
    usage = Usage({"prompt_tokens": 2, "completion_tokens": True, "total_tokens": "3"})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2, None, None)
