"""From an OpenAI request body to the engine's jobs: the prompt's token ids (chat through the
template, completions as text or ids), each checked against the context before and after
tokenizing, and one job per prompt and choice with its sampling settings.
"""

from __future__ import annotations

from tinyformers.chat import encode_chat
from tinyformers.errors import TinyformersError
from tinyformers.generation.budget import most_chars
from tinyformers.generation.params import SamplingParams
from tinyformers.serve import guided
from tinyformers.serve.engine import Request as Job
from tinyformers.serve.protocol import APIError, ChatRequest, CompletionRequest
from tinyformers.tokenizers import prompt_ids

COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


def chat_ids(model, plan: guided.Plan, context: int) -> list[int]:
    tokenizer = model.tokenizer
    if tokenizer.chat_template is None:
        raise APIError(
            400,
            f"{model.source.name} has no chat template (a base model?): use /v1/completions",
            param="messages",
        )
    chars = guided.prompt_chars(plan.messages, plan.tools)
    check_length(chars, tokenizer, context, "messages")
    try:
        return encode_chat(tokenizer, plan.messages, tools=plan.tools)
    except TinyformersError as e:  # the template refused the roles or their order
        raise APIError(400, str(e), param="messages") from None


def completion_ids(model, prompt: str | list[int], context: int) -> list[int]:
    tokenizer = model.tokenizer
    if isinstance(prompt, list):
        vocab = model.config.vocab_size
        if not all(0 <= i < vocab for i in prompt):
            bad = next(i for i in prompt if not 0 <= i < vocab)
            raise APIError(400, f"prompt: token id {bad} is outside 0..{vocab - 1}", param="prompt")
        return prompt
    check_length(len(prompt), tokenizer, context, "prompt")
    ids = prompt_ids(tokenizer, prompt)  # BOS first where the tokenizer asks for it
    if not ids:
        raise APIError(
            400, "prompt: empty, and the model has no BOS token to start from", param="prompt"
        )
    return ids


def check_length(chars: int, tokenizer, context: int, param: str) -> None:
    """Refuse text that cannot fit before tokenizing it (generation/budget.py)."""
    if chars > most_chars(tokenizer, context):
        raise APIError(
            400,
            f"{param}: {chars} characters cannot fit the {context}-token context",
            param=param,
            code="context_length_exceeded",
        )


def jobs_of(body, prompts, limit, context, settings, param) -> list[Job]:
    """One engine job per prompt and choice (choice index = prompt * n + j), context checked."""
    jobs = []
    echo = isinstance(body, CompletionRequest) and body.echo
    for ids in prompts:
        # no limit: until the context is full; a limit of 0 scores an echoed prompt
        max_new = max(context - len(ids), 1) if limit is None else limit
        if len(ids) + max_new > context:
            raise APIError(
                400,
                f"prompt of {len(ids)} tokens + {max_new} new tokens exceeds the model's context "
                f"of {context} tokens",
                param=param,
                code="context_length_exceeded",
            )
        for j in range(body.n):
            params = sampling(body, settings.sampling, j)
            jobs.append(Job(ids, max_new, params, body.stop, logprobs_of(body), echo))
    return jobs


def sampling(body, defaults: SamplingParams, choice: int) -> SamplingParams:
    """The request's sampling fields over the server's defaults; choice j draws with seed + j."""

    def pick(value, default):
        return default if value is None else value

    seed = pick(body.seed, defaults.seed)  # the request's, else the server's --seed
    return SamplingParams(
        temperature=pick(body.temperature, defaults.temperature),
        top_k=pick(body.top_k, defaults.top_k),
        top_p=pick(body.top_p, defaults.top_p),
        min_p=pick(body.min_p, defaults.min_p),
        repetition_penalty=pick(body.repetition_penalty, defaults.repetition_penalty),
        seed=None if seed is None else (seed + choice) % 2**64,
    )


def logprobs_of(body) -> int | None:
    if isinstance(body, ChatRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs
