"""``create_app(engine, ...)``: the OpenAI-compatible FastAPI application, testable without a socket.

Routes: ``GET /health``, ``GET /metrics``, ``GET /v1/models[/{id}]``, ``POST /v1/completions``,
``POST /v1/chat/completions``, and (with ``allow_runtime_loading``) ``POST /v1/load_lora_adapter``
and ``POST /v1/unload_lora_adapter``. ``model`` picks the adapter by name, or the base model by
``config.base_name``; any other name is a 404 listing what exists, never the base model in disguise.
"""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..engine import EngineOverloaded, RequestRejected, SamplingParams
from ..errors import UnknownAdapterError
from . import schemas
from .catalog import Catalog
from .config import ServerConfig
from .errors import APIError, install_error_handlers
from .generation import GenerationCall, run_generation
from .metrics import CONTENT_TYPE, ServerMetrics
from .middleware import GateMiddleware
from .security import resolve_inside_roots


class ServerState:
    """Everything a route needs, built once per app (no module-level state)."""

    def __init__(self, engine: Any, tokenizer: Any, config: ServerConfig, registry: Any = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
        self.config = config
        self.catalog = Catalog(engine, config, registry)
        self.metrics = ServerMetrics(engine.stats)
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

    def output_error(self, call: GenerationCall, error: str) -> APIError:
        """An engine failure reported on a request's output (e.g. its adapter failed to load)."""
        if call.adapter is not None and self.catalog.load_failed(call.adapter, error):
            return APIError(400, f"adapter {call.adapter!r} could not be loaded: {error}", param="model",
                            code="adapter_load_failed")
        return APIError(500, f"generation failed: {error}", code="engine_error")

    def sampling(self, req: schemas._SamplingFields, default_max: int, max_tokens: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens if max_tokens is not None else default_max,
                temperature=1.0 if req.temperature is None else req.temperature,  # the OpenAI default
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k if req.top_k not in (None, -1) else 0,  # vLLM's -1 = off
                seed=req.seed,
                stop=schemas.stop_list(req.stop),
                stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=bool(req.ignore_eos),
            )
        except RequestRejected as exc:  # the engine's own checks, where stricter than schemas.check_sampling
            raise APIError(400, str(exc), code="invalid_parameter") from None

    def submit(self, call: GenerationCall) -> Any:
        """Hand the request to the engine, translating its refusals into HTTP errors."""
        if self.closing:
            raise APIError(503, "server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        try:
            return self.engine.submit(call.prompt, adapter=call.adapter, params=call.params)
        except UnknownAdapterError:  # unloaded between the check and the submit
            raise self.unknown_model(call.model) from None
        except EngineOverloaded as exc:
            raise APIError(503, f"server overloaded: {exc}; retry later", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        except RequestRejected as exc:
            raise APIError(400, str(exc), code="request_rejected") from None


def create_app(engine: Any, tokenizer: Any = None, config: ServerConfig | None = None, *, registry: Any = None,
               **options: Any) -> FastAPI:
    """Build the app around a started (or soon started) engine.

    ``config`` or keyword options (``base_name``, ``api_key``, ``allow_runtime_loading``,
    ``adapter_roots``, ``max_body_bytes``...; see ServerConfig). The tokenizer defaults to
    ``engine.tokenizer`` and is used only for the chat template; the registry defaults to
    ``engine.registry`` and is where runtime-loaded adapters are registered.
    """
    if config is None:
        config = ServerConfig(**options)
    elif options:
        raise TypeError("pass either config or keyword options, not both")
    state = ServerState(engine, tokenizer, config, registry)
    app = FastAPI(title="loramux", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loramux = state
    install_error_handlers(app)
    app.add_middleware(GateMiddleware, max_bytes=config.max_body_bytes, api_key=config.api_key,
                       errors=state.metrics.errors)

    @app.get("/health")
    async def health() -> Response:
        if state.closing:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": state.catalog.model_cards()})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        for card in state.catalog.model_cards():
            if card["id"] == model_id:
                return JSONResponse(card)
        raise state.unknown_model(model_id)

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest, request: Request) -> Response:
        prompt = schemas.check_completion(body, max_stop=config.max_stop_sequences)
        call = GenerationCall("completions", body.model, state.adapter_for(body.model), prompt,
                              state.sampling(body, config.default_max_tokens, body.max_tokens),
                              bool(body.stream), bool(body.stream_options and body.stream_options.include_usage))
        return await run_generation(state, request, call, lambda: state.submit(call))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        messages = schemas.check_chat(body, max_stop=config.max_stop_sequences)
        adapter = state.adapter_for(body.model)
        prompt = await asyncio.to_thread(_chat_prompt, state.tokenizer, messages)  # jinja + tokenizing: off the loop
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        call = GenerationCall("chat", body.model, adapter, prompt,
                              state.sampling(body, config.default_chat_max_tokens, max_tokens),
                              bool(body.stream), bool(body.stream_options and body.stream_options.include_usage))
        return await run_generation(state, request, call, lambda: state.submit(call))

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: schemas.LoadLoraRequest) -> Response:
        _require_runtime_loading(config)
        name = _check_lora_name(body.lora_name, config)
        real = resolve_inside_roots(body.lora_path, config.adapter_roots)
        try:
            await state.catalog.load(name, real)
        except APIError:
            state.metrics.runtime_loads.labels("load", "error").inc()
            raise
        state.metrics.runtime_loads.labels("load", "ok").inc()
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
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
