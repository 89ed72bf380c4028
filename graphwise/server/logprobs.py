"""Engine logprobs in OpenAI's response shapes (legacy completions and chat).

The engine gives, for each generated token, a dict of token id -> Logprob holding the sampled
token and the requested most likely ones (ranked). Completions list the top ones by text (a
dict, so the sampled token may make it one longer, as in vLLM); chat lists exactly
`top_logprobs` of them, most likely first, with the UTF-8 bytes of each token.
"""

from __future__ import annotations

from collections.abc import Callable

from graphwise.outputs import Logprob, PromptLogprobList, SampleLogprob
from graphwise.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    LogprobEntry,
    PromptLogprobsJSON,
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


# JSON has no -inf: vLLM writes a token the model rules out as this.
MIN_LOGPROB = -9999.0


def completion_logprobs(
    token_ids: list[int],
    entries: list[SampleLogprob | None],
    top: int,
    offset: int,
    as_ids: bool,
    decode: Callable[[int], str | None] = lambda _: None,
) -> CompletionLogprobs:
    """`offset`: characters of the completion before these tokens (for text_offset). An entry
    of None (the first prompt token's, with echo) has a null logprob; `decode` names it."""
    out = CompletionLogprobs()
    for token, entry in zip(token_ids, entries, strict=True):
        if entry is None:
            text = decode(token)
            out.tokens.append(f"token_id:{token}" if as_ids or text is None else text)
            out.token_logprobs.append(None)
            out.text_offset.append(offset)
            out.top_logprobs.append(None)
            offset += len(text or "")
            continue
        lp = entry[token]
        name = token_name(token, lp, as_ids)
        out.tokens.append(name)
        out.token_logprobs.append(max(lp.logprob, MIN_LOGPROB))
        out.text_offset.append(offset)
        offset += len(lp.decoded_token or "")
        if top:
            tops = {
                token_name(t, v, as_ids): max(v.logprob, MIN_LOGPROB)
                for t, v in _ranked(entry, top)
            }
            tops.setdefault(name, max(lp.logprob, MIN_LOGPROB))
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


def prompt_logprobs_json(entries: PromptLogprobList | None) -> PromptLogprobsJSON | None:
    """vLLM's `prompt_logprobs` response field: the engine's list, -inf written as -9999."""
    if entries is None:
        return None
    return [
        None
        if entry is None
        else {
            str(t): LogprobEntry(
                logprob=max(lp.logprob, MIN_LOGPROB), rank=lp.rank, decoded_token=lp.decoded_token
            )
            for t, lp in entry.items()
        }
        for entry in entries
    ]
