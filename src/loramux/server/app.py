"""``create_app(engine, ...)``: the OpenAI-compatible FastAPI application, testable without a socket.

Routes: ``GET /health``, ``GET /metrics``, ``GET /v1/models[/{id}]``, ``POST /v1/completions``,
``POST /v1/chat/completions``, and (with ``allow_runtime_loading``) ``POST /v1/load_lora_adapter``
and ``POST /v1/unload_lora_adapter``; ``GET /openapi.json`` and ``/docs`` describe them. ``model``
picks the adapter by name, or the base model by ``config.base_name``; any other name is a 404
listing what exists, never the base model in disguise.

A request flows: pydantic shape check -> ``validation.py`` value checks (400 naming the field) ->
``ServerState.prepare`` (tokenize, context-length check, grammar compile; off the event loop) ->
``generation.py`` (one engine request per prompt, ``n`` sequences each; merge, answer or stream).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import EngineOverloaded, RequestRejected, SamplingParams
from ..errors import UnknownAdapterError
from . import schemas, validation
from .catalog import Catalog
from .config import ServerConfig
from .errors import APIError, error_response, install_error_handlers
from .generation import GenerationCall, Source, run_generation
from .structured import StructuredOutputs
from .validation import Spec
from .metrics import CONTENT_TYPE, ServerMetrics
from .middleware import GateMiddleware
from .security import resolve_inside_roots

logger = logging.getLogger(__name__)


class ServerState:
    """Everything a route needs, built once per app (no module-level state)."""

    def __init__(self, engine: Any, tokenizer: Any, config: ServerConfig, registry: Any = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
        self.config = config
        self.catalog = Catalog(engine, config, registry)
        self.metrics = ServerMetrics(engine.stats)
        self.structured = StructuredOutputs(self.tokenizer, _vocab_size(engine, self.tokenizer))
        self.closing = False

    def adapter_for(self, model: str) -> str | None:
        """``model`` -> engine adapter name (None = base); 404 listing the choices if unknown."""
        if model == self.config.base_name:
            return None
        if self.catalog.has(model):
            return model
        raise self.unknown_model(model)

    def unknown_model(self, model: str) -> APIError:
        names = self.catalog.model_ids()
        shown = ", ".join(names[:50]) + (f", ... ({len(names)} in all; GET /v1/models)" if len(names) > 50 else "")
        return APIError(404, f"model {model!r} does not exist; available models: {shown}",
                        param="model", code="model_not_found")

    def output_error(self, call: GenerationCall, out: Any) -> APIError:
        """An engine failure reported on a request's output, by its typed kind."""
        failure = getattr(out, "failure", None)
        message = str(failure.message if failure is not None else (out.error or "the engine failed this request"))
        kind = failure.kind.value if failure is not None else None
        if kind == "adapter_load_failed":  # the adapter cache logged its one line already
            return APIError(400, f"adapter {call.adapter!r} could not be loaded: {message}", param="model",
                            code="adapter_load_failed", logged=True)
        if kind == "unknown_adapter":
            return self.unknown_model(call.model)
        if kind == "invalid_request":
            return APIError(400, message, code="invalid_request")
        logger.error("request for %s failed in the engine (%s): %s", call.model, kind or "error", message)
        return APIError(500, f"generation failed: {message}", code=kind or "engine_error")

    def prepare(self, endpoint: str, model: str, adapter: str | None, spec: Spec, default_max: int) -> GenerationCall:
        """Token ids, context-length checks, the structured-output constraint, the engine params.

        Runs off the event loop (tokenizing, chat template, grammar compile)."""
        if endpoint == "chat":
            prompts: list[Any] = [_chat_prompt(self.tokenizer, spec.messages)]
        else:
            prompts = [self._encode(p) for p in spec.prompts]
        limit = _context_limit(self.engine)
        constraint = self.structured.factory(spec.response_format) if spec.response_format is not None else None
        params = []
        for ids in prompts:
            max_tokens = spec.max_tokens if spec.max_tokens is not None else default_max
            if limit is not None and isinstance(ids, list):
                left = limit - len(ids)
                if spec.max_tokens is not None and spec.max_tokens > left or left < 1:
                    what = "messages" if endpoint == "chat" else "prompt"
                    param = "max_completion_tokens" if endpoint == "chat" else "max_tokens"
                    raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                   f"{len(ids) + max_tokens} tokens ({len(ids)} in the {what}, {max_tokens} for the "
                                   f"completion). Please reduce the length of the {what} or completion.",
                                   param=param if left >= 1 else ("messages" if endpoint == "chat" else "prompt"),
                                   code="context_length_exceeded")
                max_tokens = min(max_tokens, left)  # the default: whatever the context leaves
            params.append(self.sampling(spec, max_tokens, constraint, spec.n))
        echo = None
        if spec.echo:
            echo = [p if isinstance(p, str) else self._decode(ids) for p, ids in zip(spec.prompts, prompts)]
        return GenerationCall(endpoint, model, adapter, prompts, params, spec.n, spec.stream,
                              spec.include_usage, echo, spec.logprobs, spec.prompt_logprobs is not None)

    def _encode(self, prompt: str | list[int]) -> str | list[int]:
        if isinstance(prompt, list) or self.tokenizer is None:
            return prompt
        try:
            return list(self.tokenizer(prompt)["input_ids"])
        except Exception as exc:  # noqa: BLE001 - any text the tokenizer cannot take is the client's
            raise APIError(400, f"the tokenizer cannot encode this prompt: {type(exc).__name__}: {exc}",
                           param="prompt", code="invalid_text") from None

    def _decode(self, ids: Any) -> str:
        if self.tokenizer is None:
            return ""
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - ids out of the vocabulary: the engine refuses them next
            return ""

    def sampling(self, spec: Spec, max_tokens: int, constraint: Any, n: int) -> SamplingParams:
        options: dict[str, Any] = {}
        if n > 1:
            options["n"] = n
        if spec.logprobs is not None:
            options["logprobs"] = spec.logprobs
        if spec.prompt_logprobs is not None:
            options["prompt_logprobs"] = spec.prompt_logprobs
        if spec.logit_bias:
            options["logit_bias"] = dict(spec.logit_bias)
        if constraint is not None:
            options["constraint"] = constraint
        missing = [k for k in options if k not in getattr(SamplingParams, "__dataclass_fields__", {})]
        if missing:
            raise APIError(400, f"{missing[0]} is not supported by this engine", param=missing[0],
                           code="unsupported_parameter")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=spec.temperature, top_p=spec.top_p,
                                  top_k=spec.top_k, seed=spec.seed, stop=tuple(spec.stop),
                                  stop_token_ids=tuple(spec.stop_token_ids), ignore_eos=spec.ignore_eos, **options)
        except RequestRejected as exc:  # the engine's own checks, where stricter than validation.py
            raise APIError(400, str(exc), code="invalid_parameter") from None

    def _submit_all(self, call: GenerationCall) -> list[Source]:
        """Hand every engine request of ``call`` over (all or none), translating refusals into HTTP errors."""
        if self.closing:
            raise APIError(503, "server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        sources: list[Source] = []
        try:
            for p, (prompt, params) in enumerate(zip(call.prompts, call.params)):
                handle = self.engine.submit(prompt, adapter=call.adapter, params=params)  # n sequences, one prefill
                ids = prompt if isinstance(prompt, list) else []
                sources.append(Source(handle, p, p * call.n, getattr(handle, "prompt_tokens", len(ids)), list(ids)))
        except BaseException:
            for src in sources:
                src.handle.cancel()
            raise
        return sources

    def submit(self, call: GenerationCall) -> list[Source]:
        try:
            return self._submit_all(call)
        except UnknownAdapterError:  # unloaded between the check and the submit
            raise self.unknown_model(call.model) from None
        except EngineOverloaded as exc:
            raise APIError(503, f"server overloaded: {exc}; retry later", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        except RequestRejected as exc:
            raise APIError(400, str(exc), code="request_rejected") from None


def _context_limit(engine: Any) -> int | None:
    limits = [v for v in (getattr(engine, "max_context", None), getattr(engine, "max_kv_tokens", None))
              if isinstance(v, int)]
    return min(limits) if limits else None


def _vocab_size(engine: Any, tokenizer: Any) -> int | None:
    config = getattr(getattr(engine, "model", None), "config", None)
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int):
        return size
    return len(tokenizer) if tokenizer is not None else None


class _SafeRoute(APIRoute):
    """A fault of ours inside a route is a logged 500 answered on a connection that stays open.

    (Starlette's ServerErrorMiddleware would answer and then re-raise, so uvicorn closes the
    keep-alive connection and a pooled client's next request is reset.)"""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def safe(request: Request) -> Response:
            try:
                return await handler(request)
            except (APIError, RequestValidationError, StarletteHTTPException):
                raise
            except Exception:  # noqa: BLE001
                logger.exception("internal error on %s %s", request.method, request.url.path)
                return error_response(500, "internal server error; the server log has the details", code="internal_error")

        return safe


_SSE = {"text/event-stream": {"schema": {"type": "string", "description": "with stream: true"}}}
_TEXT = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}


def create_app(engine: Any, tokenizer: Any = None, config: ServerConfig | None = None, *, registry: Any = None,
               **options: Any) -> FastAPI:
    """Build the app around a started (or soon started) engine.

    ``config`` or keyword options (``base_name``, ``api_key``, ``allow_runtime_loading``,
    ``adapter_roots``, ``max_body_bytes``...; see ServerConfig). The tokenizer defaults to
    ``engine.tokenizer`` (prompts are tokenized here, so that context limits are checked before
    submitting); the registry defaults to ``engine.registry`` and is where runtime-loaded adapters
    are registered. ``/openapi.json`` and ``/docs`` describe every route.
    """
    if config is None:
        config = ServerConfig(**options)
    elif options:
        raise TypeError("pass either config or keyword options, not both")
    state = ServerState(engine, tokenizer, config, registry)
    app = FastAPI(title="loramux", version=_version(), docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
                  description="OpenAI-compatible completions and chat over one base model and many LoRA adapters.")
    app.router.route_class = _SafeRoute
    app.state.loramux = state
    install_error_handlers(app)
    app.add_middleware(GateMiddleware, max_bytes=config.max_body_bytes, api_key=config.api_key,
                       errors=state.metrics.errors)

    @app.get("/health", response_model=schemas.Health, responses={503: {"model": schemas.Health}})
    async def health() -> Response:
        if state.closing:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response, responses=_TEXT)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=schemas.ModelList, responses=schemas.ERRORS)
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": state.catalog.model_cards()})

    @app.get("/v1/models/{model_id:path}", response_model=schemas.ModelCard, responses=schemas.ERRORS)
    async def get_model(model_id: str) -> Response:
        for card in state.catalog.model_cards():
            if card["id"] == model_id:
                return JSONResponse(card)
        raise state.unknown_model(model_id)

    @app.post("/v1/completions", response_model=schemas.CompletionResponse,
              responses={**schemas.ERRORS, 200: {"content": _SSE}})
    async def completions(body: schemas.CompletionRequest, request: Request) -> Response:
        spec = validation.check_completion(body, max_stop=config.max_stop_sequences)
        adapter = state.adapter_for(body.model)
        call = await asyncio.to_thread(state.prepare, "completions", body.model, adapter, spec, config.default_max_tokens)
        return await run_generation(state, request, call)

    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletionResponse,
              responses={**schemas.ERRORS, 200: {"content": _SSE}})
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        spec = validation.check_chat(body, max_stop=config.max_stop_sequences)
        adapter = state.adapter_for(body.model)
        call = await asyncio.to_thread(state.prepare, "chat", body.model, adapter, spec, config.default_chat_max_tokens)
        return await run_generation(state, request, call)

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses={**schemas.ERRORS, **_TEXT})
    async def load_lora_adapter(body: schemas.LoadLoraRequest) -> Response:
        _require_runtime_loading(config)
        name = _check_lora_name(body.lora_name, config)
        validation.check_text(body.lora_path, "lora_path")
        real = resolve_inside_roots(body.lora_path, config.adapter_roots)
        try:
            await state.catalog.load(name, real, inplace=bool(body.load_inplace))
        except APIError:
            state.metrics.runtime_loads.labels("load", "error").inc()
            raise
        state.metrics.runtime_loads.labels("load", "ok").inc()
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses={**schemas.ERRORS, **_TEXT})
    async def unload_lora_adapter(body: schemas.UnloadLoraRequest) -> Response:
        _require_runtime_loading(config)
        name = _check_lora_name(body.lora_name, config)
        try:
            await state.catalog.unload(name)
        except APIError:
            state.metrics.runtime_loads.labels("unload", "error").inc()
            raise
        state.metrics.runtime_loads.labels("unload", "ok").inc()
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("loramux")
    except Exception:  # noqa: BLE001 - not installed (a source checkout)
        return "0"


def _require_runtime_loading(config: ServerConfig) -> None:
    if not config.allow_runtime_loading:
        raise APIError(403, "runtime loading is off; start the server with --allow-runtime-loading and --adapter-root DIR",
                       code="runtime_loading_disabled")


def _check_lora_name(name: str, config: ServerConfig) -> str:
    if not name or len(name) > 200 or any(c in name for c in "\x00\n\r/\\") or name.strip() != name:
        raise APIError(400, f"lora_name {name!r} must be 1-200 characters without slashes, newlines or edge spaces",
                       param="lora_name", code="invalid_name")
    if name == config.base_name:
        raise APIError(400, f"lora_name {name!r} is the base model's name; choose another", param="lora_name",
                       code="invalid_name")
    return name


def _chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat template with the assistant turn opened (the engine adds nothing)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "the base model's tokenizer has no chat template; use /v1/completions", code="no_chat_template")
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    except Exception as exc:  # jinja raises for roles or orders a template does not accept
        raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages",
                       code="chat_template_error") from None
    return list(encoded["input_ids"])
