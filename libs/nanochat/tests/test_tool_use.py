"""The SFT mixture's synthetic tool-use conversations render with the call format of docs/tools.md:
the tools listed in the (untrained) prompt, the call as a trained python part, the tool's result
as an untrained python_output part, then the trained answer in the same assistant turn."""

import json

from nanochat.report import deviations
from nanochat.stages.options import ChatSftOptions
from nanochat.tasks.mixtures import sft_mixture
from nanochat.tasks.tooluse import ToolUse
from nanochat.tokenizer import TOOLS_HEADER, Tokenizer

TEXT = 'What is the weather like in Oslo? {"name": "get_weather", "arguments": {"city": "Oslo"}} 12 plus 3 is 15. '


def test_rendered_rows_have_the_call_tokens_and_masks():
    tok = Tokenizer.train_from_iterator([TEXT] * 20, vocab_size=400)
    sp = tok.encode_special
    task = ToolUse(40)
    assert len(task) == 40 and ToolUse(40)[7] == task[7]  # the same rows from the same seed
    calls = parallel = 0
    for conversation in task:
        ids, mask = tok.render_conversation(conversation, max_tokens=None)
        text = tok.decode(ids)
        assert TOOLS_HEADER in text and all(t["name"] in text for t in conversation["tools"])
        start = ids.index(sp("<|assistant_start|>"))
        assert not any(mask[:start]), "the prompt and the tool list are never trained on"
        assert ids.count(sp("<|assistant_start|>")) == 1 and ids[-1] == sp("<|assistant_end|>") and mask[-1] == 1
        if sp("<|python_start|>") not in ids:
            continue
        calls += 1
        starts = [i for i, t in enumerate(ids) if t == sp("<|python_start|>")]
        ends = [i for i, t in enumerate(ids) if t == sp("<|python_end|>")]
        outputs = [i for i, t in enumerate(ids) if t == sp("<|output_start|>")]
        output_ends = [i for i, t in enumerate(ids) if t == sp("<|output_end|>")]
        n = len(starts)
        parallel += n == 2
        assert n in (1, 2) and len(ends) == len(outputs) == len(output_ends) == n
        # The calls back to back, then their results in the same order, then the answer.
        assert starts[0] == start + 1 and all(s == e + 1 for s, e in zip(starts[1:], ends))
        assert ends[-1] + 1 == outputs[0] and output_ends[-1] < len(ids) - 1
        assert all(mask[starts[0] : ends[-1] + 1]), "the calls are trained on"
        assert not any(mask[outputs[0] : output_ends[-1] + 1]), "the tools' results are not"
        assert all(mask[output_ends[-1] + 1 :]), "the answer after them is"
        for ps, pe, os_, oe in zip(starts, ends, outputs, output_ends):
            call = json.loads(tok.decode(ids[ps + 1 : pe]))
            assert call["name"] in {t["name"] for t in conversation["tools"]}
            assert isinstance(call["arguments"], dict)
            json.loads(tok.decode(ids[os_ + 1 : oe]))
    assert 20 <= calls < 40  # most conversations call a tool, some answer directly
    assert 0 < parallel < calls  # some ask two things at once


def test_the_option_is_named_a_deviation():
    assert ChatSftOptions().tool_use_in_mixture == 0
    lineage = type("L", (), {"meta": {"sft": {"options": {"tool_use_in_mixture": 300}}}})()
    assert any("300 synthetic tool-use" in line for line in deviations(lineage))


def test_the_sft_mixture_takes_them_on_request(tmp_path):
    from test_tasks import arc_rows, gsm8k_rows, put, smoltalk_rows

    put(tmp_path, "HuggingFaceTB/smol-smoltalk", "data", "train", smoltalk_rows(6))
    put(tmp_path, "allenai/ai2_arc", "ARC-Easy", "train", arc_rows(3, tag="e"))
    put(tmp_path, "allenai/ai2_arc", "ARC-Challenge", "train", arc_rows(2, tag="c"))
    put(tmp_path, "openai/gsm8k", "main", "train", gsm8k_rows(4))
    plain = sft_mixture(tmp_path, "train")
    with_tools = sft_mixture(tmp_path, "train", tool_use=7)
    assert len(with_tools) == len(plain) + 7
    assert sum("tools" in with_tools[i] for i in range(len(with_tools))) == 7


def test_a_prompt_ending_in_a_tool_result_leaves_the_turn_open():
    import pytest
    from nanochat.tokenizer import ConversationError, tool_call_text

    tok = Tokenizer.train_from_iterator([TEXT] * 20, vocab_size=400)
    sp = tok.encode_special
    call = {
        "role": "assistant",
        "content": [{"type": "python", "text": tool_call_text("get_weather", {"city": "Oslo"})}],
    }
    messages = [{"role": "user", "content": "Weather in Oslo?"}, call, {"role": "tool", "content": "rainy"}]
    prompt = tok.render_for_completion({"messages": messages, "tools": [{"name": "get_weather"}]})
    assert prompt[-1] == sp("<|output_end|>") and prompt.count(sp("<|assistant_start|>")) == 1
    assert tok.decode(prompt).endswith(
        '<|python_start|>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
        "<|python_end|><|output_start|>rainy<|output_end|>"
    )
    # Without a tool result last, a prompt primes a new assistant turn as before.
    follow = tok.render_for_completion(
        {
            "messages": [
                *messages,
                {"role": "assistant", "content": "Rain."},
                {"role": "user", "content": "And tomorrow?"},
            ]
        }
    )
    assert follow[-1] == sp("<|assistant_start|>") and follow.count(sp("<|assistant_start|>")) == 2
    with pytest.raises(ConversationError, match="must follow an assistant"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]})
