"""OpenAI-compatible generation routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) and the
seed's simple `POST /generate`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ayar.serve.backend import Sampling
from ayar.serve.errors import APIError, error_body
from ayar.serve.personalize import personalize
from ayar.serve.scheduler import Job, QueueFull
from ayar.serve.schemas import ChatRequest, CompletionRequest, GenerateRequest

router = APIRouter()


@router.get("/v1/models", tags=["openai"])
async def list_models(request: Request):
    state = request.app.state.ayar
    now = int(time.time())
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": now, "owned_by": "ayar"} for m in state.model_names()],
    }


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(body: ChatRequest, request: Request):
    if body.logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    call = await _Call.prepare(request, body, "chat.completion")
    if body.user:
        messages = await run_in_threadpool(_personalized, call, messages)
    prompt = await run_in_threadpool(call.backend.encode_chat, messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    return await call.run([prompt] * body.n, max_tokens, {"messages": messages}, new_user_turn=messages[-1])


@router.post("/v1/completions", tags=["openai"])
async def completions(body: CompletionRequest, request: Request):
    if body.echo or body.logprobs:
        raise APIError(
            400, "echo and logprobs are not supported by this server", param="echo" if body.echo else "logprobs"
        )
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or len(prompts) * body.n > 32:
        raise APIError(400, "prompt: give 1 to 32 prompts (times n)", param="prompt")
    call = await _Call.prepare(request, body, "text_completion")
    ids = [await run_in_threadpool(call.backend.encode_text, p) for p in prompts]
    rows = [p for p in ids for _ in range(body.n)]
    return await call.run(rows, body.max_tokens or 16, {"prompt": prompts})


@router.post("/generate", tags=["simple"])
async def generate(body: GenerateRequest, request: Request):
    """A prompt in, the reply out (the chat template is applied)."""
    chat = ChatRequest(
        model=body.model or request.app.state.ayar.require_ready().default_model,
        messages=[{"role": "user", "content": body.prompt}],
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        user=body.user,
    )
    response = await chat_completions(chat, request)
    reply = json.loads(response.body)
    return JSONResponse(
        {
            "status": "success",
            "prompt": body.prompt,
            "model": reply["model"],
            "response": reply["choices"][0]["message"]["content"],
            "finish_reason": reply["choices"][0]["finish_reason"],
            "tokens_generated": reply["usage"]["completion_tokens"],
        },
        # the chat reply's own headers (request id, cache, A/B variant), not its length: this body is another
        headers={k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")},
    )


def _personalized(call: "_Call", messages: list[dict]) -> list[dict]:
    store, user = call.state.store, call.user_key
    history = store.history(user, call.model, 2 * call.state.settings.history_turns)
    return personalize(messages, store.get_profile(user), history)


@dataclass
class _Call:
    """One generation request on its way through: resolved model, sampling, and the response it builds."""

    request: Request
    body: object
    kind: str  # "chat.completion" or "text_completion"
    model: str = ""
    variant: str | None = None
    sampling: Sampling = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    async def prepare(cls, request: Request, body, kind: str) -> "_Call":
        call = cls(request, body, kind)
        state = call.state
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(
                400,
                "presence_penalty and frequency_penalty are not supported: leave them at 0",
                param="presence_penalty" if body.presence_penalty else "frequency_penalty",
            )
        call.model, call.variant = state.resolve(body.model, sticky=body.user or getattr(request.state, "client", None))
        base = state.default_sampling()
        temperature = base.temperature if body.temperature is None else body.temperature
        call.sampling = Sampling(
            temperature, body.top_p if body.top_p is not None else base.top_p, body.seed if temperature > 0 else None
        )
        if len(body.stops()) > 4:
            raise APIError(400, "stop: at most 4 stop sequences", param="stop")
        unsupported = [f for f in ("tools", "tool_choice", "functions", "response_format") if getattr(body, f, None)]
        if unsupported:
            raise APIError(
                400,
                f"{', '.join(unsupported)}: not supported by this server (no tool calls or constrained output); "
                "leave them out",
                param=unsupported[0],
            )
        return call

    @property
    def state(self):
        return self.request.app.state.ayar

    @property
    def backend(self):
        return self.state.backend

    @property
    def user_key(self) -> str:
        return self.state.user_key(getattr(self.request.state, "client", ""), self.body.user)

    def headers(self, cache: str | None = None) -> dict:
        h = {"x-ayar-model": self.model}
        if self.variant:
            h["x-ayar-variant"] = self.variant
        if cache:
            h["x-ayar-cache"] = cache
        return h

    async def run(
        self, prompts: list[list[int]], max_tokens: int | None, shown: dict, new_user_turn: dict | None = None
    ):
        state, body = self.state, self.body
        limit, window = state.settings.max_tokens_limit, self.backend.context_window
        if min(map(len, prompts)) == 0:  # nothing to continue from: refused here, before it reaches the batch
            raise APIError(400, "the prompt is empty (0 tokens): send at least one character", param="prompt")
        longest = max(map(len, prompts))
        if max_tokens is None and longest >= window:
            raise APIError(
                400,
                f"the prompt has {longest} tokens: the model's context window of {window} tokens leaves "
                "no room for an answer; shorten the prompt",
                param="messages",
                code="context_length_exceeded",
            )
        max_tokens = max_tokens or min(state.settings.default_max_tokens, window - longest)
        if max_tokens > limit:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {limit}", param="max_tokens")
        if longest + max_tokens > window:
            raise APIError(
                400,
                f"the prompt has {longest} tokens and max_tokens is {max_tokens}: {longest + max_tokens} "
                f"is over the model's context window of {window} tokens; shorten the prompt or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        cache_key = None
        if not body.stream and (self.sampling.temperature == 0 or self.sampling.seed is not None):
            params = {
                # one API key's callers never get another's cached answers (a hit would tell them what was asked)
                "client": getattr(self.request.state, "client", None) if state.keys else None,
                "model": self.model,
                "model_loaded": state.loaded_at(self.model),  # an adapter reloaded under a name starts afresh
                "max_tokens": max_tokens,
                "sampling": self.sampling.__dict__,
                "stop": body.stops(),
                "n": body.n,
                **shown,
            }
            cache_key = state.cache.key(self.kind, params)
            hit = state.cache.get(cache_key)
            state.metrics.cache.labels("hit" if hit else "miss").inc()
            if hit is not None:
                self._count(hit["usage"], ttft=None)
                if new_user_turn is not None and body.user:  # the answer joins the user's history, as a miss would
                    await run_in_threadpool(self._remember, new_user_turn, hit["choices"][0]["message"]["content"])
                return JSONResponse({**hit, "id": self._id(), "created": int(time.time())}, headers=self.headers("hit"))

        job = Job(self.sampling, asyncio.get_running_loop())
        for k, ids in enumerate(prompts):  # rows are each prompt n times: with a seed, choice i samples with seed + i
            s = self.sampling
            own = Sampling(s.temperature, s.top_p, s.seed + k % body.n) if s.seed is not None and body.n > 1 else None
            job.add_row(ids, max_tokens, self.model, body.stops(), own)
        try:
            state.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), code="server_busy", headers={"Retry-After": str(e.retry_after)})
        state.metrics.generations.labels(self.model, self.variant or "").inc()
        prompt_tokens = sum(map(len, prompts[:: body.n]))  # rows are each prompt n times
        if body.stream:
            return StreamingResponse(
                self._stream(job, prompt_tokens, new_user_turn),
                media_type="text/event-stream",
                headers={**self.headers(), "Cache-Control": "no-cache"},
            )
        texts, reasons, tokens, ttft = await self._collect(job)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(tokens),
            "total_tokens": prompt_tokens + sum(tokens),
        }
        self._count(usage, ttft)
        result = {
            "object": self.kind,
            "model": self.model,
            "choices": [self._choice(i, texts[i], reasons[i]) for i in range(len(texts))],
            "usage": usage,
        }
        if cache_key:
            state.cache.put(cache_key, result)
        if new_user_turn is not None and body.user:
            await run_in_threadpool(self._remember, new_user_turn, texts[0])
        return JSONResponse(
            {**result, "id": self._id(), "created": self.created}, headers=self.headers("miss" if cache_key else None)
        )

    async def _collect(self, job: Job):
        n = len(job.rows)
        texts, reasons, tokens, ttft = [""] * n, [None] * n, [0] * n, None
        left = n
        deadline = job.submitted + self.state.settings.request_timeout
        checked = time.perf_counter()
        try:
            while left:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    event = None
                now = time.perf_counter()
                if now > deadline:
                    job.cancelled = True
                    raise APIError(
                        504, f"the request took longer than {self.state.settings.request_timeout:g} s", code="timeout"
                    )
                if event is None or now - checked >= 0.5:  # also while tokens flow
                    checked = now
                    if await self.request.is_disconnected():
                        job.cancelled = True  # nobody waits for the answer: stop generating it
                        raise APIError(499, "client disconnected")
                if event is None:
                    continue
                kind, i = event[0], event[1]
                if kind == "delta":
                    ttft = ttft if ttft is not None else time.perf_counter() - job.submitted
                    texts[i] += event[2]
                elif kind == "finish":
                    if event[2] == "unloaded":
                        raise APIError(
                            404, f"model {self.model!r} was unloaded while the request waited", param="model"
                        )
                    reasons[i], tokens[i], left = event[2], event[3], left - 1
                else:
                    raise APIError(500, event[2])
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        return texts, reasons, tokens, ttft

    async def _stream(self, job: Job, prompt_tokens: int, new_user_turn: dict | None):
        chat, left, total, ttft = self.kind == "chat.completion", len(job.rows), 0, None
        texts = [""] * len(job.rows)
        try:
            if chat:
                for i in range(len(job.rows)):
                    yield self._sse(
                        [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
                    )
            deadline = job.submitted + self.state.settings.request_timeout
            while left:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=max(0.0, deadline - time.perf_counter()))
                except asyncio.TimeoutError:
                    took = f"the request took longer than {self.state.settings.request_timeout:g} s"
                    yield f"data: {json.dumps(error_body(504, took, code='timeout'))}\n\n"
                    return
                kind, i = event[0], event[1]
                if kind == "delta":
                    ttft = ttft if ttft is not None else time.perf_counter() - job.submitted
                    texts[i] += event[2]
                    delta = {"delta": {"content": event[2]}} if chat else {"text": event[2], "logprobs": None}
                    yield self._sse([{"index": i, **delta, "finish_reason": None}])
                elif kind == "finish":
                    left, total = left - 1, total + event[3]
                    end = {"delta": {}} if chat else {"text": "", "logprobs": None}
                    yield self._sse([{"index": i, **end, "finish_reason": event[2]}])
                else:
                    yield f"data: {json.dumps(error_body(500, event[2]))}\n\n"
                    return
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": total, "total_tokens": prompt_tokens + total}
            self._count(usage, ttft)
            opts = getattr(self.body, "stream_options", None)
            if opts is not None and opts.include_usage:
                yield self._sse([], usage=usage)
            yield "data: [DONE]\n\n"
            if new_user_turn is not None and self.body.user:
                await run_in_threadpool(self._remember, new_user_turn, texts[0])
        finally:
            if left:
                job.cancelled = True  # the client went away mid-stream

    def _sse(self, choices: list[dict], usage: dict | None = None) -> str:
        chunk = {
            "id": self._id(),
            "object": f"{self.kind}.chunk" if self.kind == "chat.completion" else self.kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def _choice(self, i: int, text: str, reason: str) -> dict:
        if self.kind == "chat.completion":
            return {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": None,
            }
        return {"index": i, "text": text, "finish_reason": reason, "logprobs": None}

    def _id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat.completion" else "cmpl-") + self.id

    def _count(self, usage: dict, ttft: float | None) -> None:
        m = self.state.metrics
        m.tokens.labels(self.model).inc(usage["completion_tokens"])
        m.prompt_tokens.labels(self.model).inc(usage["prompt_tokens"])
        if ttft is not None:
            m.ttft.labels(self.model).observe(ttft)

    def _remember(self, user_turn: dict, reply: str) -> None:
        self.state.store.append(self.user_key, self.model, [user_turn, {"role": "assistant", "content": reply}])
