"""Translation between the OpenAI wire format and the engine: sampling, logprobs, usage."""

from __future__ import annotations

from collections.abc import Sequence

from auto_glm.engine.output_processor import PROMPT_CONTEXT, IncrementalDetokenizer
from auto_glm.engine.outputs import RequestOutput, TokenLogprob
from auto_glm.sampling_params import SamplingParams
from auto_glm.serving.errors import APIError
from auto_glm.serving.protocol import ChatCompletionRequest, SamplingFields
from auto_glm.serving.response_format import logit_bias, structured_output
from auto_glm.serving.responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from auto_glm.serving.token_bytes import token_bytes

__all__ = ["chat_logprobs", "completion_logprobs", "sampling_params", "usage"]

_INT64 = 2**63


def sampling_params(
    body: SamplingFields, max_tokens: int, logprobs: int | None, choice: int
) -> SamplingParams:
    """Engine parameters of choice ``choice``; seeded choices use ``seed + choice`` so they
    differ from each other yet repeat across identical calls."""
    seed = None
    if body.seed is not None:  # wrapped into int64, the range torch generators accept
        seed = (body.seed + choice + _INT64) % (2 * _INT64) - _INT64
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    response_format = body.response_format if isinstance(body, ChatCompletionRequest) else None
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=seed,
            stop=stop,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
            spaces_between_special_tokens=body.spaces_between_special_tokens,
            logit_bias=logit_bias(body.logit_bias),
            structured_output=structured_output(response_format),
        )
    except ValueError as exc:  # the schema mirrors these checks; this is a safety net
        raise APIError(400, str(exc), code="invalid_value") from exc


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _tail(output: RequestOutput, count: int) -> tuple[list[int], list[TokenLogprob | None]]:
    """The last ``count`` tokens of ``output`` and their logprobs (a stream's delta)."""
    if count == 0:
        return [], []
    return output.outputs.token_ids[-count:], output.outputs.logprobs[-count:]


def chat_logprobs(tokenizer, output: RequestOutput, count: int) -> ChatLogprobs:
    """Chat logprobs of the last ``count`` tokens. ``bytes`` are each token's own, so a
    character split across tokens (whose ``token`` texts are U+FFFD) joins back whole."""
    read = token_bytes(tokenizer)
    entries = []
    for token_id, entry in zip(*_tail(output, count), strict=True):
        logprob, top = entry if entry is not None else (0.0, [])
        alternatives = [
            TopLogprob(token=_token(tokenizer, i), logprob=lp, bytes=list(read(i))) for i, lp in top
        ]
        entries.append(
            ChatTokenLogprob(
                token=_token(tokenizer, token_id),
                logprob=logprob,
                bytes=list(read(token_id)),
                top_logprobs=alternatives,
            )
        )
    return ChatLogprobs(content=entries)


def _text_offsets(tokenizer, output: RequestOutput, count: int, start: int) -> list[int]:
    """Where the text of each of the last ``count`` tokens starts in the completion's text,
    given that the first starts at ``start``. Decoded incrementally, as the reply's text
    is: a character split across tokens starts where its first token does."""
    ids = output.outputs.token_ids
    first = len(ids) - count
    before = ids[max(0, first - PROMPT_CONTEXT) : first]  # the context it decodes with
    context = [*output.prompt_token_ids[-PROMPT_CONTEXT:], *before]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids=context)
    offsets = []
    for token_id in ids[len(ids) - count :]:
        offsets.append(start)
        start += len(detokenizer.step([token_id]))
    return offsets


def completion_logprobs(
    tokenizer, output: RequestOutput, count: int, text_offset: int
) -> CompletionLogprobs:
    """Legacy completions logprobs; ``text_offset`` is where the first token's text starts."""
    result = CompletionLogprobs(text_offset=_text_offsets(tokenizer, output, count, text_offset))
    for token_id, entry in zip(*_tail(output, count), strict=True):
        logprob, top = entry if entry is not None else (0.0, [])
        result.tokens.append(_token(tokenizer, token_id))
        result.token_logprobs.append(logprob)
        result.top_logprobs.append({_token(tokenizer, i): lp for i, lp in top})
    return result


def usage(outputs: Sequence[RequestOutput], n: int) -> Usage:
    """Token counts of one call whose outputs are ``n`` choices per prompt, prompt by prompt;
    each prompt counts once however many choices it has."""
    firsts = outputs[::n]
    prompt = sum(len(o.prompt_token_ids) for o in firsts)
    completion = sum(len(o.outputs.token_ids) for o in outputs)
    cached = sum(o.num_cached_tokens for o in firsts)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )
