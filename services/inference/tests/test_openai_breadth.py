"""OpenAI API breadth (issue 28): logprobs and echo against a full forward pass of the same tiny
model, penalties and logit_bias, unknown fields, /tokenize and /detokenize, through the official
`openai` SDK (raw HTTP where the SDK cannot say it) against the session's server process.
"""

import threading

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from inference.api import create_app
from inference.settings import Settings
from nanochat.checkpoint import load_checkpoint

CHAT = [{"role": "user", "content": "The quick brown fox"}]
MODEL = "nanochat"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(checkpoints):
    """The served checkpoint, loaded again here for the reference forward passes."""
    return load_checkpoint(checkpoints["a"]).model


@pytest.fixture(scope="module")
def ids_by_bytes(tok) -> dict[bytes, int]:
    return {tok.decode_bytes([i]): i for i in range(tok.vocab_size)}


@torch.no_grad()
def reference(model, tokens: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of `tokens`, without a cache."""
    return torch.log_softmax(model(torch.tensor([tokens]))[0], dim=-1)


def check_against_forward(model, tok, prompt: list[int], entries, ids_by_bytes) -> None:
    """Chat logprob entries (token, logprob, bytes, top_logprobs) equal the full forward's."""
    generated = [ids_by_bytes[bytes(e.bytes)] for e in entries]
    lp = reference(model, prompt + generated)
    for i, e in enumerate(entries):
        row = lp[len(prompt) - 1 + i]
        assert e.logprob == pytest.approx(float(row[generated[i]]), abs=1e-3)
        top = row.topk(3)
        assert [ids_by_bytes[bytes(t.bytes)] for t in e.top_logprobs] == top.indices.tolist()
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert e.token == tok.decode([generated[i]]) or "\ufffd" in e.token
        assert e.top_logprobs[0].logprob == e.logprob  # greedy took the most likely token


def test_chat_logprobs_equal_a_full_forward_streamed_and_not(client, model, tok, ids_by_bytes):
    args = dict(model=MODEL, messages=CHAT, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    plain = client.chat.completions.create(**args)
    entries = plain.choices[0].logprobs.content
    assert len(entries) == plain.usage.completion_tokens - (plain.choices[0].finish_reason == "stop")
    prompt = tok.render_for_completion({"messages": CHAT})
    check_against_forward(model, tok, prompt, entries, ids_by_bytes)

    streamed = []
    usage = None
    for chunk in client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed.extend(choice.logprobs.content)
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens

    without = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=8)
    assert without.choices[0].logprobs is None
    assert without.choices[0].message.content == plain.choices[0].message.content


def test_completions_echo_logprobs_equal_a_full_forward_streamed_and_not(client, model, tok):
    text = "The lazy dog"
    prompt = tok.encode(text, prepend=tok.bos_token_id)
    plain = client.completions.create(model=MODEL, prompt=text, max_tokens=5, temperature=0, echo=True, logprobs=2)
    choice = plain.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(text)
    assert lp.tokens[0] == "<|bos|>" and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    generated = len(lp.tokens) - len(prompt)
    assert generated == plain.usage.completion_tokens - (choice.finish_reason == "stop")
    # Every position, prompt and generated alike, against one forward over the greedy sequence.
    all_ids = list(prompt)
    for _ in range(generated):
        all_ids.append(int(reference(model, all_ids)[-1].argmax()))
    reference_lp = reference(model, all_ids)
    assert [tok.decode_bytes([t]).decode("utf-8", errors="replace") for t in all_ids[1:]] == lp.tokens[1:]
    for position in range(1, len(all_ids)):
        row = reference_lp[position - 1]
        assert lp.token_logprobs[position] == pytest.approx(float(row[all_ids[position]]), abs=1e-3)
        assert sorted(lp.top_logprobs[position].values(), reverse=True) == pytest.approx(
            row.topk(2).values.tolist(), abs=1e-3
        )
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[1] == 0
    assert lp.text_offset[len(prompt)] == len(text)  # the first generated token starts after the echo

    tokens, logprobs, texts = [], [], []
    for chunk in client.completions.create(
        prompt=text, max_tokens=5, temperature=0, echo=True, logprobs=2, stream=True, model=MODEL
    ):
        texts.append(chunk.choices[0].text)
        if chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            logprobs += chunk.choices[0].logprobs.token_logprobs
    assert "".join(texts) == choice.text and texts[0].startswith(text)
    assert tokens == lp.tokens and logprobs == lp.token_logprobs

    echo_only = client.completions.create(prompt=text, max_tokens=5, temperature=0, echo=True, model=MODEL)
    assert echo_only.choices[0].text == choice.text and echo_only.choices[0].logprobs is None


def test_max_tokens_0_with_echo_scores_the_prompt_and_generates_nothing(client, model, tok):
    text = "The lazy dog"
    prompt = tok.encode(text, prepend=tok.bos_token_id)
    reference_lp = reference(model, prompt)
    kw = dict(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=1.0, n=2)
    whole = client.completions.create(**kw)
    assert whole.usage.completion_tokens == 0 and whole.usage.prompt_tokens == len(prompt)
    for choice in whole.choices:
        assert choice.text == text and choice.finish_reason == "length"
        lp = choice.logprobs
        assert len(lp.tokens) == len(prompt) and lp.token_logprobs[0] is None
        for position in range(1, len(prompt)):
            assert lp.token_logprobs[position] == pytest.approx(
                float(reference_lp[position - 1][prompt[position]]), abs=1e-3
            )
    chunks = list(client.completions.create(**{**kw, "n": 1}, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    streamed = [
        lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs
    ]
    assert streamed == whole.choices[0].logprobs.token_logprobs
    assert chunks[-1].choices[0].finish_reason == "length"
    bare = client.completions.create(model=MODEL, prompt=text, max_tokens=0)
    assert bare.choices[0].text == "" and bare.usage.completion_tokens == 0


def test_every_sample_echoes_its_own_prompt(server, tok):
    body = {"prompt": ["The lazy", "A fox"], "n": 2, "best_of": 2, "max_tokens": 3, "echo": True, "logprobs": 1}
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "seed": 4}, timeout=60)
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c in choices:
        text = body["prompt"][c["index"] // 2]
        prompt = tok.encode(text, prepend=tok.bos_token_id)
        assert c["text"].startswith(text) and c["logprobs"]["token_logprobs"][0] is None
        assert "".join(c["logprobs"]["tokens"][1 : len(prompt)]) == text
        assert all(len(top) == 1 for top in c["logprobs"]["top_logprobs"][1:])


def test_token_id_prompts_are_the_prompt_as_given_in_all_four_forms(server, client, tok):
    text = "The quick brown fox"
    ids = tok.encode(text, prepend=tok.bos_token_id)
    args = dict(model=MODEL, max_tokens=6, temperature=0)
    from_text = client.completions.create(prompt=text, **args).choices[0].text
    from_ids = client.completions.create(prompt=ids, **args)
    assert from_ids.choices[0].text == from_text and from_ids.usage.prompt_tokens == len(ids)
    both = client.completions.create(prompt=[ids, ids[1:]], echo=True, **args)
    assert both.choices[0].text == tok.decode(ids) + from_text
    assert both.choices[1].text.startswith(text)  # without <|bos|>: the ids as given, echoed as text
    mixed = client.completions.create(prompt=[text, ids], **args)
    assert [c.text for c in mixed.choices] == [from_text, from_text]
    for bad in ([], [[]], [1, "a"], [[1], 2], True, [True], {"a": 1}):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": bad, "max_tokens": 2}, timeout=30)
        assert r.status_code == 400, (bad, r.text)
        err = r.json()["error"]
        assert err["param"] == "prompt" and "token ids" in err["message"] and len(err["message"]) < 300, err
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": [tok.vocab_size], "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_logit_bias_forces_and_bans_and_bad_ids_are_400s(client, tok):
    forced = tok.encode(" fox")[0]
    r = client.completions.create(prompt="The", max_tokens=6, temperature=0, logit_bias={str(forced): 100}, model=MODEL)
    assert r.choices[0].text == " fox" * 6
    solo = client.completions.create(prompt="The", max_tokens=6, temperature=0, model=MODEL, logprobs=0)
    first = solo.choices[0].logprobs.tokens[0]
    banned = tok.encode(first)[0]
    r = client.completions.create(
        prompt="The", max_tokens=6, temperature=0, logit_bias={str(banned): -100}, model=MODEL
    )
    assert r.choices[0].text != solo.choices[0].text and not r.choices[0].text.startswith(first)
    for bias, fragment in [
        ({str(tok.vocab_size + 5): 1}, "logit_bias names token"),
        ({"x": 1}, "token ids"),
        ({"\u00b2": 1}, "token ids"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(prompt="The", max_tokens=2, logit_bias=bias, model=MODEL)
        assert e.value.body["param"] == "logit_bias" and fragment in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, logit_bias={"3": 101})


def test_a_biased_request_beside_an_unbiased_one_leaves_it_as_alone(client, tok):
    def ask(**extra):
        return client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24, **extra)

    solo = ask().choices[0].message.content
    results = {}

    def run(name, **extra):
        results[name] = ask(**extra).choices[0].message.content

    threads = [
        threading.Thread(target=run, args=("biased",), kwargs={"logit_bias": {str(tok.encode(" dog")[0]): 30}}),
        threading.Thread(target=run, args=("penalised",), kwargs={"frequency_penalty": 2.0, "presence_penalty": 1}),
        threading.Thread(target=run, args=("plain",)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["plain"] == solo
    assert results["biased"] != solo and " dog" in results["biased"]
    assert results["penalised"] != solo


def test_unknown_fields_are_400s_naming_them_and_ignorable_ones_pass(server, client):
    url = f"{server.url}/v1/chat/completions"
    for field, value in [("logprobz", True), ("reasoning_effort", "low"), ("functions", [])]:
        r = httpx.post(url, json={"messages": CHAT, "max_tokens": 2, field: value}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert field in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 2, "suffix": "b"}, timeout=30)
    assert r.status_code == 400 and "suffix" in r.json()["error"]["message"]
    options = {"include_usage": True}
    r = httpx.post(url, json={"messages": CHAT, "max_tokens": 2, "stream_options": options}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body={"min_p": 0.1})
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, top_logprobs=2)
    ok = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=2, user="u-1", store=False, metadata={"k": "v"}, service_tier="auto"
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_null_options_take_their_defaults(server):
    """OpenAI's reference makes the optional fields nullable; clients send null for 'not set'."""
    nulls = ["top_p", "n", "stream", "stream_options", "seed", "presence_penalty", "frequency_penalty"]
    chat = {"messages": CHAT, "temperature": 0, "max_tokens": 4}
    for path, body, more in [
        ("/v1/chat/completions", chat, ["logprobs", "top_logprobs", "logit_bias", "tools", "response_format"]),
        ("/v1/completions", {"prompt": "The", "temperature": 0, "max_tokens": 4}, ["logprobs", "echo", "suffix"]),
    ]:
        plain = httpx.post(server.url + path, json=body, timeout=30)
        nulled = httpx.post(server.url + path, json={**body, **dict.fromkeys(nulls + more)}, timeout=30)
        assert plain.status_code == nulled.status_code == 200, nulled.text
        assert nulled.json()["choices"] == plain.json()["choices"]


def test_tokenize_and_detokenize_in_vllms_shapes(server, tok):
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "The quick", "return_token_strs": True}, timeout=30)
    body = r.json()
    assert body["tokens"] == tok.encode("The quick", prepend=tok.bos_token_id)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    assert body["token_strs"][0] == "<|bos|>" and "".join(body["token_strs"][1:]) == "The quick"
    bare = httpx.post(f"{server.url}/tokenize", json={"prompt": "The quick", "add_special_tokens": False}).json()
    assert bare["tokens"] == tok.encode("The quick") and bare["token_strs"] is None
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == tok.render_for_completion({"messages": CHAT})
    closed = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert closed["tokens"] == chat["tokens"][:-1]  # without the trailing <|assistant_start|>
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    with_tools = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT, "tools": tools}).json()
    answered = httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": CHAT, "tools": tools, "max_tokens": 1}, timeout=30
    ).json()
    assert with_tools["count"] == answered["usage"]["prompt_tokens"] > chat["count"]
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": bare["tokens"]}).json()
    assert back == {"prompt": "The quick"}
    for path, payload, param in [
        ("/detokenize", {"tokens": [tok.vocab_size]}, "tokens"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, None),
        ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
        ("/tokenize", {"prompt": "a", "bogus": 1}, "bogus"),
    ]:
        r = httpx.post(server.url + path, json=payload, timeout=30)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "/tokenize" in paths and "/detokenize" in paths


def test_tokenize_needs_the_read_token():
    with TestClient(create_app(Settings(api_token="s3cret"))) as c:
        assert c.post("/tokenize", json={"prompt": "a"}).status_code == 401
        assert c.post("/detokenize", json={"tokens": [1]}).status_code == 401
