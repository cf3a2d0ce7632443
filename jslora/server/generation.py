"""One OpenAI response's choices as the handlers see them (`Generation`), and how they go out: waiting
for a choice's end, OpenAI's logprobs forms, and server-sent events of several choices merged.
jslora/server/handlers.py submits the requests; this module only reads their updates."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Callable

from fastapi import Request

from jslora.request import RequestOutput
from jslora.sampling import SamplingParams
from jslora.server.errors import error_body
from jslora.server.protocol import Usage


@dataclasses.dataclass
class Generation:
    """One submitted request: what its choice of the response needs."""
    request_id: str
    updates: asyncio.Queue
    sampling: SamplingParams
    model: str
    chat: bool
    prompt_tokens: int
    arrival: float
    index: int = 0                # the choice it fills (prompt i, sample j: i * n + j)
    echo: str = ""                # completions with echo: the prompt's text, before the completion
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    response_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.response_id}"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def usage(self, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=self.prompt_tokens + completion_tokens)


async def wait_for_disconnect(http: Request) -> None:
    """Returns when the client closes the connection (the body is already read: the next ASGI message
    is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def until_finished(http: Request, gen: Generation, abort: Callable[[str], None]):
    """The request's final update, or None if the client disconnected first (then it is aborted at
    once: a client that times out and retries must not leave its first try running)."""
    disconnected = asyncio.ensure_future(wait_for_disconnect(http))
    try:
        while True:
            next_update = asyncio.ensure_future(gen.updates.get())
            await asyncio.wait({next_update, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if not next_update.done():
                next_update.cancel()
                abort(gen.request_id)
                return None
            if next_update.result().finished:
                return next_update.result()
    except asyncio.CancelledError:
        abort(gen.request_id)
        raise
    finally:
        disconnected.cancel()


def logprobs_json(decode: Callable[[list[int]], str], chat: bool, token_ids: list[int], logprobs: list | None,
                  offset: int = 0) -> dict | None:
    """The tokens' logprobs in OpenAI's form: chat {"content": [{token, logprob, bytes, top_logprobs}]},
    completions the legacy tokens, token_logprobs, top_logprobs, text_offset (from offset)."""
    if logprobs is None:
        return None
    if chat:
        def entry(token_id: int, logprob: float) -> dict:
            text = decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in zip(ids, values)]}
                            for t, (lp, ids, values) in zip(token_ids, logprobs)]}
    tokens = [decode([t]) for t in token_ids]
    offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [lp for lp, _, _ in logprobs],
            "top_logprobs": [{decode([t]): v for t, v in zip(ids, values)} for _, ids, values in logprobs],
            "text_offset": offsets}


def prompt_logprobs_json(decode: Callable[[list[int]], str], prompt_ids: list[int], entries: list) -> dict:
    """Completions' legacy logprobs of the prompt's tokens (echo): None for the first, which has no
    context, as OpenAI and vLLM give it."""
    tokens = [decode([t]) for t in prompt_ids]
    return {"tokens": tokens,
            "token_logprobs": [None if e is None else e[0] for e in entries],
            "top_logprobs": [None if e is None else {decode([t]): v for t, v in zip(e[1], e[2])} for e in entries],
            "text_offset": [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]}


def join_logprobs(first: dict | None, second: dict | None) -> dict | None:
    """Two runs of completions' legacy logprobs, one after the other."""
    if first is None or second is None:
        return first or second
    return {key: first[key] + second[key] for key in first}


def sse_chunk(gen: Generation, text: str, finish: str | None = None, first: bool = False,
              completion_tokens: int = 0, logprobs: dict | None = None) -> str:
    if gen.chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": gen.index, "delta": delta if text or first else {}, "finish_reason": finish,
                  "logprobs": logprobs}
    else:
        choice = {"index": gen.index, "text": text, "finish_reason": finish, "logprobs": logprobs}
    chunk = {"id": gen.id, "object": gen.chunk_object, "created": gen.created, "model": gen.model,
             "choices": [choice]}
    if finish is not None:
        chunk["usage"] = gen.usage(completion_tokens).model_dump()
    return f"data: {json.dumps(chunk)}\n\n"


class ChoiceStreamer:
    """Server-sent events of a response's choices. decode: token ids -> text; record(gen, output):
    the server's latency metrics; abort(request_id): the engine's abort."""

    def __init__(self, decode: Callable[[list[int]], str], record: Callable[[Generation, RequestOutput], None],
                 abort: Callable[[str], None]):
        self.decode, self.record, self.abort = decode, record, abort

    async def stream(self, gens: list[Generation], usage: Usage, usage_chunk: bool = False):
        """Every choice's events as their tokens come; then, with usage_chunk (stream_options.include_usage),
        a last chunk with no choices and the usage, as OpenAI's."""
        events: asyncio.Queue = asyncio.Queue()
        done: set[str] = set()

        async def pump(gen: Generation) -> None:
            try:
                async for event in self._choice_events(gen):
                    await events.put(event)
            finally:
                await events.put(gen)  # this choice is over

        tasks = [asyncio.ensure_future(pump(gen)) for gen in gens]
        try:
            while len(done) < len(gens):
                event = await events.get()
                if isinstance(event, Generation):
                    done.add(event.request_id)
                elif isinstance(event, int):
                    usage.completion_tokens += event
                else:
                    yield event
            if usage_chunk:
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                first = gens[0]
                yield "data: " + json.dumps({"id": first.id, "object": first.chunk_object, "created": first.created,
                                             "model": first.model, "choices": [],
                                             "usage": usage.model_dump()}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            for gen in gens:
                if gen.request_id not in done:  # the client went away: free the request's pages
                    self.abort(gen.request_id)

    async def _choice_events(self, gen: Generation):
        """One choice's events; text deltas hold back what could still turn out to be a stop string, and
        each carries the logprobs of the tokens since the last one. Yields its completion token count
        (an int) last."""
        holdback = max((len(s) for s in gen.sampling.stop), default=1) - 1
        tokens, logprobs, sent = [], [], ""
        reported = 0  # tokens whose logprobs went out

        def pending_logprobs(until: int) -> dict | None:
            nonlocal reported
            if gen.sampling.logprobs is None:
                return None
            out = logprobs_json(self.decode, gen.chat, tokens[reported:until], logprobs[reported:until],
                                offset=len(gen.echo) + len(sent))
            reported = until
            return out

        update = None
        if gen.sampling.prompt_logprobs is None:
            yield sse_chunk(gen, gen.echo, first=True)
        else:  # echo with logprobs: the prompt's come with its first token, and go out with its text
            update = await gen.updates.get()
            entries = update.prompt_logprobs or (update.output.prompt_logprobs if update.output else None)
            yield sse_chunk(gen, gen.echo, first=True, logprobs=None if entries is None else
                            prompt_logprobs_json(self.decode, gen.prompt_ids, entries))
        while True:
            update = update or await gen.updates.get()
            tokens += update.new_token_ids
            logprobs += update.new_logprobs or []
            if update.finished:
                out = update.output
                self.record(gen, out)
                if out.error:  # the stream ends with an OpenAI-style error event
                    yield f"data: {json.dumps(error_body(out.error_status or 503, out.error))}\n\n"
                else:
                    logprobs = out.logprobs or []
                    yield sse_chunk(gen, out.text[len(sent):], finish=out.finish_reason,
                                    completion_tokens=len(tokens), logprobs=pending_logprobs(len(logprobs)))
                yield len(tokens)
                return
            text = self.decode(tokens)
            safe = text[: len(text) - holdback] if holdback else text
            safe = safe.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for the rest
            if len(safe) > len(sent) and safe.startswith(sent):
                yield sse_chunk(gen, safe[len(sent):], logprobs=pending_logprobs(len(logprobs)))
                sent = safe
            update = None
