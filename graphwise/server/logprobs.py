"""Engine logprobs in OpenAI's response shapes (legacy completions and chat).

The engine gives, for each generated token, a dict of token id -> Logprob holding the sampled
token and the requested most likely ones (ranked). Completions list the top ones by text (a
dict, so the sampled token may make it one longer, as in vLLM); chat lists exactly
`top_logprobs` of them, most likely first, with the UTF-8 bytes of each token.
"""

from __future__ import annotations

from graphwise.outputs import Logprob, SampleLogprob
from graphwise.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
)


def token_name(token_id: int, lp: Logprob, as_ids: bool) -> str:
    if as_ids or lp.decoded_token is None:
        return f"token_id:{token_id}"
    return lp.decoded_token


def _ranked(entry: SampleLogprob, top: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(
        ((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top),
        key=lambda item: item[1].rank or 0,
    )
    return ranked[:top]


def completion_logprobs(
    token_ids: list[int], entries: list[SampleLogprob], top: int, offset: int, as_ids: bool
) -> CompletionLogprobs:
    """`offset`: characters of the completion before these tokens (for text_offset)."""
    out = CompletionLogprobs()
    for token, entry in zip(token_ids, entries, strict=True):
        lp = entry[token]
        name = token_name(token, lp, as_ids)
        out.tokens.append(name)
        out.token_logprobs.append(lp.logprob)
        out.text_offset.append(offset)
        offset += len(lp.decoded_token or "")
        if top:
            tops = {token_name(t, v, as_ids): v.logprob for t, v in _ranked(entry, top)}
            tops.setdefault(name, lp.logprob)
            out.top_logprobs.append(tops)
        else:
            out.top_logprobs.append(None)
    return out


def chat_logprobs(
    token_ids: list[int], entries: list[SampleLogprob], top: int, as_ids: bool
) -> ChatLogprobs:
    def item(cls: type, token: int, lp: Logprob):  # noqa: ANN202 - one of the two models
        name = token_name(token, lp, as_ids)
        return cls(token=name, logprob=lp.logprob, bytes=list(name.encode("utf-8")))

    content = []
    for token, entry in zip(token_ids, entries, strict=True):
        head = item(ChatTokenLogprob, token, entry[token])
        head.top_logprobs = [item(ChatTopLogprob, t, v) for t, v in _ranked(entry, top)]
        content.append(head)
    return ChatLogprobs(content=content)
