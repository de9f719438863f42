"""Drives a Mycel node with the official openai package (run by tests/openai_api.rs)."""
import openai

client = openai.OpenAI(max_retries=0, timeout=60)

ids = [m.id for m in client.models.list().data]
assert "tiny-bert" in ids and "tiny-llama" in ids, ids

# The client asks for base64 by default and decodes it.
emb = client.embeddings.create(model="tiny-bert", input=["the cat sat", "the dog ran"])
assert len(emb.data) == 2 and len(emb.data[0].embedding) == 16, emb
norm = sum(x * x for x in emb.data[0].embedding) ** 0.5
assert abs(norm - 1.0) < 1e-3, norm
floats = client.embeddings.create(model="tiny-bert", input="the cat sat", encoding_format="float")
assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, emb.data[0].embedding)) < 1e-6

messages = [{"role": "user", "content": "the cat"}]
chat = client.chat.completions.create(model="tiny-llama", messages=messages, temperature=0, max_tokens=8)
text = chat.choices[0].message.content
assert chat.choices[0].finish_reason in ("stop", "length"), chat
assert chat.usage.completion_tokens >= 1, chat

stream = client.chat.completions.create(
    model="tiny-llama", messages=messages, temperature=0, max_tokens=8, stream=True,
    stream_options={"include_usage": True},
)
pieces, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
assert "".join(pieces) == text, (pieces, text)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

multi = client.chat.completions.create(
    model="tiny-llama", messages=messages, temperature=1.0, seed=3, max_tokens=4, n=2
)
assert [c.index for c in multi.choices] == [0, 1], multi

# Text completions: the prompt as it is, no chat template (so fewer prompt tokens).
done = client.completions.create(model="tiny-llama", prompt="the cat", temperature=0, max_tokens=8)
assert done.object == "text_completion", done
assert done.choices[0].finish_reason in ("stop", "length"), done
assert 1 <= done.usage.completion_tokens <= 8, done
assert done.usage.prompt_tokens < chat.usage.prompt_tokens, (done.usage, chat.usage)
stream = client.completions.create(
    model="tiny-llama", prompt="the cat", temperature=0, max_tokens=8, stream=True
)
pieces = [c.choices[0].text for c in stream if c.choices]
assert "".join(pieces) == done.choices[0].text, (pieces, done)
for field, value in [("echo", True), ("logprobs", 6), ("best_of", 2)]:
    try:
        client.completions.create(model="tiny-llama", prompt="the cat", max_tokens=4, **{field: value})
        raise SystemExit(f"{field} must be refused")
    except openai.BadRequestError as e:
        assert field in str(e), e

# Log-probabilities, parsed into the client's own types.
scored = client.chat.completions.create(
    model="tiny-llama", messages=messages, temperature=0, max_tokens=8, logprobs=True,
    top_logprobs=2,
)
content = scored.choices[0].logprobs.content
assert len(content) == scored.usage.completion_tokens, scored
assert scored.choices[0].message.content == text, (scored, text)
assert bytes(b for c in content for b in c.bytes).decode("utf-8", "replace") == text, content
for c in content:
    assert c.logprob <= 0 and len(c.top_logprobs) == 2, c
    assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob, c
stream = client.chat.completions.create(
    model="tiny-llama", messages=messages, temperature=0, max_tokens=8, logprobs=True,
    top_logprobs=2, stream=True,
)
streamed = [
    c for chunk in stream if chunk.choices and chunk.choices[0].logprobs
    for c in chunk.choices[0].logprobs.content
]
assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
scored = client.completions.create(
    model="tiny-llama", prompt="the cat", temperature=0, max_tokens=8, logprobs=2
)
columns = scored.choices[0].logprobs
assert "".join(columns.tokens) == done.choices[0].text, columns
assert len(columns.token_logprobs) == len(columns.tokens) == len(columns.top_logprobs)
assert columns.text_offset[0] == len("the cat"), columns

# Structured output: the client's own parse helper, with a pydantic model as the schema.
import typing

import pydantic


class Answer(pydantic.BaseModel):
    ok: bool
    n: int
    mood: typing.Literal["calm", "cross"]


parsed = client.chat.completions.parse(
    model="tiny-llama", messages=messages, temperature=0, max_tokens=200, response_format=Answer
)
answer = parsed.choices[0].message.parsed
assert isinstance(answer, Answer) and answer.mood in ("calm", "cross"), parsed
loose = client.chat.completions.create(
    model="tiny-llama", messages=messages, temperature=0, max_tokens=60,
    response_format={"type": "json_object"},
)
assert loose.choices[0].message.content.lstrip().startswith("{"), loose

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise SystemExit("an unknown model must fail")
except openai.NotFoundError as e:
    assert "no-such-model" in str(e), e
try:
    client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=0)
    raise SystemExit("max_tokens 0 must fail")
except openai.BadRequestError as e:
    assert "max_tokens" in str(e), e

print("ALL OK")
