"""The OpenAI-compatible HTTP API: FastAPI routes over one Engine and its Scheduler.

    config = ServerConfig(port=8000)
    sock = bind(config)                                     # before loading: a port in use fails at once
    serve(Engine.load(RuntimeConfig(model=DIR)), config, sock)   # blocks; what `moe-offload serve` runs
    app = create_app(engine, ServerConfig())                # the ASGI app, for any ASGI server

Routes: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST
/v1/chat/completions (both with `stream: true` as server-sent events ending in `data: [DONE]`),
POST /tokenize and POST /detokenize (vLLM's and llama-server's shapes), GET /tokenizer_info
(vLLM's), GET /metrics (Prometheus text), GET /openapi.json (request schemas included, for
clients and fuzzers).

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx for
anything the client can fix and 5xx only for our own faults. Bodies are read and parsed here, not
by FastAPI, so that size, UTF-8, JSON and schema problems each get their own one-line message.
A request's choices (prompts x n) decode together (server/choices.py). A client that
disconnects (streaming or not) cancels its request: it leaves the queue at once, or its generation
stops at the next step.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import secrets
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import SamplingParams
from ..constrain import GrammarError, json_schema_grammar
from ..engine import Engine
from ..errors import UserError
from .config import ServerConfig
from .metrics import Metrics
from .choices import Choices, Job
from .scheduler import QueueFull, Scheduler
from . import anthropic
from .anthropic import CountTokensRequest, MessagesRequest, template_messages
from .shapes import ChatShape, ChoiceWriter, CompletionShape
from .schemas import (COMPLETION_DEFAULT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                      SamplingFields, TokenizeRequest, describe)

log = logging.getLogger("moe_offload.server")

PUBLIC_PATHS = ("/health",)
ANTHROPIC_PATHS = ("/v1/messages",)
COUNTED_PATHS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
                 "/detokenize", "/tokenizer_info", "/v1/messages", "/v1/messages/count_tokens")
CLIENT_CLOSED = 499    # nginx's status for "the client went away before the answer"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, headers=None, path: str = "") -> JSONResponse:
    """OpenAI's error shape, or Anthropic's on the Messages API's paths."""
    body = anthropic.error_body(status, message) if path.startswith(ANTHROPIC_PATHS) else error_body(status, message,
                                                                                                     param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    metrics = Metrics()
    scheduler = Scheduler(engine, metrics, max_waiting=config.max_queue)

    @asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="moe-offload", summary="OpenAI-compatible API for Mixture-of-Experts models",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    if config.api_key:
        app.add_middleware(RequireApiKey, api_key=config.api_key)
    app.add_middleware(CountRequests, metrics=metrics)
    app.openapi = lambda: _openapi(app)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.headers, request.url.path)

    @app.exception_handler(StarletteHTTPException)   # routing: unknown path (404), wrong method (405)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = f"{e.detail}: {request.method} {request.url.path} (see /openapi.json)"
        return error_response(e.status_code, message, headers=getattr(e, "headers", None), path=request.url.path)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("internal error")
        return error_response(500, "internal server error; see the server log", path=request.url.path)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(engine, model_id)
        return model_card(engine)

    @app.post("/tokenize", openapi_extra=_request_body(TokenizeRequest))
    async def tokenize(request: Request):
        body = _validate(TokenizeRequest, await read_json(request, config))
        _check_optional_model(engine, body.model)
        return tokenize_answer(engine, body)

    @app.post("/detokenize", openapi_extra=_request_body(DetokenizeRequest))
    async def detokenize(request: Request):
        body = _validate(DetokenizeRequest, await read_json(request, config))
        _check_optional_model(engine, body.model)
        _check_token_ids(engine, body.tokens, "tokens")
        text = engine.tokenizer.decode(body.tokens)
        return {"prompt": text, "content": text}    # vLLM's key, llama-server's key

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return engine.tokenizer.info() | {"model_max_length": engine.max_context}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_text():
        text = metrics.render(scheduler.queue_depth, scheduler.max_waiting, scheduler.active_count, engine.expert_stats())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions", openapi_extra=_request_body(CompletionRequest))
    async def completions(request: Request):
        body = _validate(CompletionRequest, await read_json(request, config))
        _check_model(engine, body.model)
        jobs = []
        for prompt_ids, text in _completion_prompts(engine, body.prompt, body.adds_bos):
            params = _sampling_params(engine, body, prompt_ids, body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
            jobs += _samples(len(jobs), prompt_ids, params, body.n, echo=text if body.echo else None)
        return await respond(request, body, CompletionShape, jobs)

    @app.post("/v1/chat/completions", openapi_extra=_request_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        body = _validate(ChatCompletionRequest, await read_json(request, config))
        _check_model(engine, body.model)
        tools = body.tool_specs()
        prompt_ids = _chat_prompt(engine, [m.as_template_message() for m in body.messages], tools)
        params = _sampling_params(engine, body, prompt_ids, body.new_tokens_limit, None,
                                  extra_stops=engine.tokenizer.chat_stop_strings)
        grammar = await _tool_grammar(engine, tools, body.tool_mode, body.parallel_tool_calls,
                                      lambda i: f"tools.{i}.function.parameters")
        if grammar:
            params = replace(params, grammar=grammar)
        elif body.response_format and body.response_format.reply_schema is not None:
            param = "response_format.json_schema.schema"
            grammar = await _checked_grammar(engine, _json_grammar(body.response_format.reply_schema, param), param)
            params = replace(params, grammar=grammar)
        return await respond(request, body, ChatShape, _samples(0, prompt_ids, params, body.n, tools=tools))

    @app.post("/v1/messages", openapi_extra=_request_body(MessagesRequest))
    async def messages(request: Request):
        body = _validate(MessagesRequest, await read_json(request, config))
        _check_model(engine, body.model)
        tools = body.tool_specs()
        prompt_ids = _chat_prompt(engine, template_messages(body), tools)
        grammar = await _tool_grammar(engine, tools, body.tool_mode, body.parallel_tool_calls,
                                      lambda i: f"tools.{i}.input_schema")
        if body.reply_schema is not None:
            param = "output_config.format.schema"
            grammar = await _checked_grammar(engine, _json_grammar(body.reply_schema, param), param)
        params = SamplingParams(max_new_tokens=_new_tokens(engine, prompt_ids, body.max_tokens, None, "max_tokens",
                                                           "messages"),
                                temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed,
                                stop=(*(body.stop_sequences or ()), *engine.tokenizer.chat_stop_strings), grammar=grammar)
        choices, watcher = start(request, [Job(0, 0, prompt_ids, params)])
        message_id = anthropic.new_message_id()
        if body.stream:
            return StreamingResponse(message_events(choices, watcher, body, message_id, len(prompt_ids)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = "".join([piece async for _job, piece in run_to_end(choices, watcher)])
        if choices.gone:
            return Response(status_code=CLIENT_CLOSED)
        ((_, sequence),) = choices.ended
        return anthropic.message_json(body, sequence.run, text, message_id, engine.name,
                                      engine.tokenizer.tool_format)

    @app.post("/v1/messages/count_tokens", openapi_extra=_request_body(CountTokensRequest))
    async def count_tokens(request: Request):
        body = _validate(CountTokensRequest, await read_json(request, config))
        _check_model(engine, body.model)
        return {"input_tokens": len(_chat_prompt(engine, template_messages(body), body.tool_specs()))}

    def start(request: Request, jobs: list[Job]) -> tuple[Choices, asyncio.Task]:
        """Queue a request's first choice (429 when the queue is full) and watch its client."""
        choices = Choices(scheduler, jobs, asyncio.get_running_loop())
        try:
            choices.start()
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry after a second", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        return choices, asyncio.create_task(cancel_on_disconnect(request, choices))

    async def run_to_end(choices: Choices, watcher: asyncio.Task):
        """(job, text piece) of a request's choices, not streamed: a generation's UserError is a 400."""
        try:
            async for job, _sequence, piece in choices.events():
                if piece is not None:
                    yield job, piece
        except UserError as e:
            raise ApiError(400, str(e)) from None
        finally:
            watcher.cancel()
            choices.cancel()   # a no-op when all finished; stops the running one if we got here any other way

    async def message_events(choices: Choices, watcher: asyncio.Task, body: MessagesRequest, message_id: str,
                             prompt_tokens: int):
        """Anthropic's stream: message_start, the content blocks, message_delta, message_stop. Text streams
        piece by piece; a reply that may call tools is held until it ends, then its blocks come whole."""
        withhold = body.tool_specs() is not None
        pieces, run = [], None
        try:
            yield anthropic.message_start(message_id, engine.name, prompt_tokens)
            async for _job, sequence, piece in choices.events():
                if piece is None:
                    run = sequence.run
                    break
                if not pieces and not withhold:
                    yield anthropic.event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
                pieces.append(piece)
                if not withhold:
                    yield anthropic.event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
            if run is None:   # cancelled: nobody is listening
                return
            blocks, stop_reason, stop_sequence = anthropic.reply_blocks(body, run, "".join(pieces), engine.tokenizer.tool_format)
            if withhold or not pieces:
                for index, block in enumerate(blocks):
                    for line in anthropic.block_events(index, block):
                        yield line
            else:
                yield anthropic.event("content_block_stop", {"index": 0})
            for line in anthropic.message_end(stop_reason, stop_sequence, run):
                yield line
        except UserError as e:
            yield anthropic.event("error", {"error": anthropic.error_body(400, str(e))["error"]})
        except Exception:
            log.exception("generation failed")
            yield anthropic.event("error", {"error": anthropic.error_body(500, "generation failed; see the server log")["error"]})
        finally:
            watcher.cancel()
            choices.cancel()

    async def respond(request: Request, body: SamplingFields, shape, jobs: list[Job]):
        choices, watcher = start(request, jobs)
        envelope = {"id": f"{shape.id_prefix}{uuid.uuid4().hex}", "object": shape.object, "created": int(time.time()),
                    "model": engine.name}
        if body.stream:
            events = stream_events(choices, watcher, {**envelope, "object": shape.chunk_object}, shape, body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts: dict[int, list[str]] = {job.index: [] for job in jobs}
        async for job, piece in run_to_end(choices, watcher):
            texts[job.index].append(piece)
        if choices.gone:
            return Response(status_code=CLIENT_CLOSED)
        answers = [ChoiceWriter(shape, job, engine.tokenizer).whole(sequence.run, "".join(texts[job.index]))
                   for job, sequence in sorted(choices.ended, key=lambda ended: ended[0].index)]
        return {**envelope, "choices": answers, "usage": choices.usage()}

    async def stream_events(choices: Choices, watcher: asyncio.Task, envelope: dict, shape, include_usage: bool):
        def chunk(choice: dict) -> str:
            return sse({**envelope, "choices": [choice]})

        try:
            writers: dict[int, ChoiceWriter] = {}
            async for job, sequence, piece in choices.events():
                if job.index not in writers:
                    writers[job.index] = ChoiceWriter(shape, job, engine.tokenizer)
                    for choice in writers[job.index].opening(sequence.run):
                        yield chunk(choice)
                writer = writers[job.index]
                choice = writer.end(sequence.run) if piece is None else writer.piece(sequence.run, piece)
                if choice is not None:
                    yield chunk(choice)
            if choices.gone:   # cancelled: nobody is listening
                return
            if include_usage:
                yield sse({**envelope, "choices": [], "usage": choices.usage()})
        except UserError as e:
            yield sse(error_body(400, str(e)))
        except Exception:
            log.exception("generation failed")
            yield sse(error_body(500, "generation failed; see the server log"))
        finally:
            watcher.cancel()
            choices.cancel()
        yield "data: [DONE]\n\n"

    async def cancel_on_disconnect(request: Request, choices: Choices):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        choices.cancel()

    app.state.scheduler = scheduler
    app.state.metrics = metrics
    return app


def bind(config: ServerConfig) -> socket.socket:
    """The server's socket, bound as uvicorn binds one (SO_REUSEADDR) but before the model loads, so that a
    port in use or a --host that is not this machine's is one line at once. `serve` listens on it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {config.host!r} is neither an address nor a known host name ({e})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {config.port}: {config.host} port {config.port} is in use; stop what listens "
                            f"there or choose another --port") from None
        raise UserError(f"--host {config.host}: cannot listen there ({e.strerror}); use an address of this machine, "
                        f"e.g. 127.0.0.1, or 0.0.0.0 for all of them") from None
    return sock


def serve(engine: Engine, config: ServerConfig, sock: socket.socket) -> None:
    """Run the server on `sock` (from `bind`) until Ctrl-C: what `moe-offload serve` does after loading the engine."""
    import uvicorn

    if not config.api_key and not _is_loopback(config.host):
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", config.host)
    port = sock.getsockname()[1]    # the one the system chose for --port 0
    print(f"serving {engine.name} on http://{config.host}:{port} (OpenAI API under /v1); Ctrl-C stops", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), log_level="info", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


def model_card(engine: Engine) -> dict:
    return {"id": engine.name, "object": "model", "created": 0, "owned_by": "moe-offload",
            "max_context": engine.max_context}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def read_json(request: Request, config: ServerConfig) -> dict:
    """The body as a JSON object; 413 past --max-body-bytes, 408 when it takes longer than --body-timeout to
    arrive (a client trickling it would hold a connection forever), 400 for bad UTF-8, bad JSON or a non-object."""
    limit = config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes; the limit is {limit} (--max-body-bytes)",
                       code="request_too_large")
    try:
        body = await asyncio.wait_for(_read_body(request, limit), config.body_timeout)
    except asyncio.TimeoutError:   # (asyncio.timeout would need Python 3.11)
        raise ApiError(408, f"the request body did not arrive within {config.body_timeout:g} s (--body-timeout); "
                            "send it at once", code="request_timeout", headers={"Connection": "close"}) from None
    if not body:
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}); send UTF-8 JSON") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the request contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff); send valid Unicode") from None
    return data


async def _read_body(request: Request, limit: int) -> bytearray:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes (--max-body-bytes)", code="request_too_large")
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _validate(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        param, message = describe(e)
        raise ApiError(400, message, param=param) from None


def _check_model(engine: Engine, name: str) -> None:
    if name != engine.name:
        raise ApiError(404, f"model {name!r} is not served here; this server serves {engine.name!r} (GET /v1/models)",
                       param="model", code="model_not_found")


def _check_optional_model(engine: Engine, name: str | None) -> None:
    if name is not None:
        _check_model(engine, name)


def _check_token_ids(engine: Engine, ids: list[int], param: str) -> None:
    vocab = engine.config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param=param)


def _completion_prompts(engine: Engine, prompt, add_bos: bool) -> list[tuple[list[int], str]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists -> (token ids, text) each;
    the text as sent (BOS before it if `add_bos`), or decoded from the ids."""
    tokenizer = engine.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], str):
        return [(tokenizer.encode(text, add_special_tokens=add_bos), text) for text in prompt]
    if isinstance(prompt[0], int):
        prompt = [prompt]
    for ids in prompt:
        _check_token_ids(engine, ids, "prompt")
    return [(ids, tokenizer.decode(ids)) for ids in prompt]


def _chat_prompt(engine: Engine, messages: list[dict], tools: list[dict] | None) -> list[int]:
    try:
        return engine.tokenizer.encode_chat(messages, tools=tools)
    except UserError as e:
        raise ApiError(400, str(e), param="messages") from None


async def _tool_grammar(engine: Engine, tools: list[dict] | None, mode: str, parallel: bool, param_of) -> str | None:
    """Checks each tool's parameters (400 naming `param_of(i)`); the grammar of the reply when `mode` requires
    calls ("required" or a tool's name), else None."""
    for i, tool in enumerate(tools or ()):
        if tool["function"].get("parameters") is not None:
            await _checked_grammar(engine, _json_grammar(tool["function"]["parameters"], param_of(i)), param_of(i))
    if mode in ("none", "auto"):
        return None
    grammar = engine.tokenizer.tool_format.grammar(tools, None if mode == "required" else mode, parallel)
    return await _checked_grammar(engine, grammar, "tools")


def _json_grammar(schema: dict, param: str) -> str:
    try:
        return json_schema_grammar(schema)
    except GrammarError as e:
        raise ApiError(400, f"{param}: cannot be compiled: {e}", param=param) from None


async def _checked_grammar(engine: Engine, grammar: str, param: str) -> str:
    """`grammar`, compiled once to check it (in a thread: a large schema, or the first one, which builds the
    token table, can take a second); 400 naming `param` if it cannot be."""
    try:
        await asyncio.to_thread(lambda: engine.grammars.check(grammar))   # the token table, too, is built there
    except GrammarError as e:
        raise ApiError(400, f"{param}: cannot be compiled: {e}", param=param) from None
    return grammar


def _samples(first_index: int, prompt_ids: list[int], params: SamplingParams, n: int, echo: str | None = None,
             tools: list[dict] | None = None) -> list[Job]:
    """The n completions of one prompt; with a seed, completion j samples with seed + j."""
    return [Job(first_index + j, j, prompt_ids, params if params.seed is None else replace(params, seed=params.seed + j),
                echo, tools) for j in range(n)]


def tokenize_answer(engine: Engine, body: TokenizeRequest) -> dict:
    """vLLM's answer ({"count", "max_model_len", "tokens", "token_strs"}) or llama-server's ({"tokens"})."""
    tokenizer = engine.tokenizer
    if body.content is not None:
        ids = tokenizer.encode(body.content, add_special_tokens=body.add_special)
        if body.with_pieces:
            return {"tokens": [{"id": i, "piece": piece} for i, piece in zip(ids, tokenizer.token_texts(ids))]}
        return {"tokens": ids}
    if body.messages is not None:
        messages = [m.as_template_message() for m in body.messages]
        try:
            if body.add_special_tokens is None:   # the ids /v1/chat/completions would prefill
                ids = tokenizer.encode_chat(messages, body.add_generation_prompt)
            else:
                ids = tokenizer.encode(tokenizer.render_chat(messages, body.add_generation_prompt), body.add_special_tokens)
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None
    else:
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    token_strs = tokenizer.token_texts(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": engine.max_context, "tokens": ids, "token_strs": token_strs}


def _sampling_params(engine: Engine, body: SamplingFields, prompt_ids: list[int], requested: int | None,
                     default: int | None, extra_stops: tuple[str, ...] = ()) -> SamplingParams:
    """`requested` new tokens, or `default` (None: the rest of the context), checked against the context."""
    prompt_param = "prompt" if isinstance(body, CompletionRequest) else "messages"
    new_tokens = _new_tokens(engine, prompt_ids, requested, default, body.new_tokens_field, prompt_param)
    return SamplingParams(max_new_tokens=new_tokens, temperature=body.temperature, top_k=max(body.top_k, 0),
                          top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          seed=body.seed, stop=body.stop_strings + extra_stops, logprobs=body.logprobs_top,
                          prompt_logprobs=body.prompt_logprobs_top)


def _new_tokens(engine: Engine, prompt_ids: list[int], requested: int | None, default: int | None, field: str,
                prompt_param: str) -> int:
    """`requested` new tokens, or `default` (None: the rest of the context), checked against the context;
    400 naming `field` or `prompt_param`."""
    try:
        engine.check_prompt(prompt_ids)
    except UserError as e:
        raise ApiError(400, str(e), param=prompt_param, code="context_length_exceeded") from None
    room = engine.max_context - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens and fills the context of {engine.max_context}; "
                            "shorten it", code="context_length_exceeded")
    if requested is None:
        requested = room if default is None else min(default, room)
    if requested > room:
        raise ApiError(400, f"{field}: {requested} new tokens do not fit: the context holds {engine.max_context} "
                            f"tokens and the prompt uses {len(prompt_ids)}, so at most {room}",
                       param=field, code="context_length_exceeded")
    return requested


def _request_body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, plus the request schemas (we parse bodies ourselves, so it cannot see them)."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version="1", summary=app.summary, routes=app.routes)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest, MessagesRequest,
                      CountTokensRequest):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        app.openapi_schema = spec
    return app.openapi_schema


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class RequireApiKey:
    """ASGI middleware: every path but /health needs `Authorization: Bearer KEY` or (Anthropic's SDK)
    `x-api-key: KEY` (401 otherwise)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.bearer, self.key = f"Bearer {api_key}".encode(), api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            headers = dict(scope["headers"])
            if not (secrets.compare_digest(headers.get(b"authorization", b""), self.bearer)
                    or secrets.compare_digest(headers.get(b"x-api-key", b""), self.key)):
                message = "missing or wrong API key; send the header `Authorization: Bearer KEY` (or `x-api-key: KEY`)"
                response = error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                                          path=scope["path"])
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CountRequests:
    """ASGI middleware: counts answers by endpoint and status; 499 when the client left before one started."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = CLIENT_CLOSED

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = scope["path"] if scope["path"] in COUNTED_PATHS else "other"
            self.metrics.count_request(endpoint, status)
