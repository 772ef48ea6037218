"""The OpenAI-compatible routes, one module per endpoint; ``app.create_app`` includes ``ROUTERS``.

- ``health``: ``/health`` and ``/metrics`` (Prometheus text)
- ``models``: ``/v1/models`` and ``/v1/models/{id}``
- ``chat``: ``/v1/chat/completions`` (parse, prepare images and video, stream or answer whole)
- ``completions``: ``/v1/completions``
- ``responses``: ``/v1/responses`` (OpenAI's Responses API, run as a one-choice chat completion)
- ``tokenize``: ``/tokenize``, ``/detokenize`` (vLLM's) and ``/version``
- ``page``: the web chat page at ``/`` and its files at ``/static/`` (``page_router()``, included by the app)
- shared: ``common`` (the model and ``n`` checks, SamplingParams from a request, logprobs in OpenAI's
  shapes) and ``streaming`` (SSE, choices merged from several engine requests, client disconnects)

Threading rule (ARCHITECTURE.md): everything here runs in the HTTP layer. A handler parses
the JSON into typed models (``protocol``), fetches image bytes (``media``), decodes, tiles, renders the
template and tokenizes (``InputProcessor``, on a worker thread so the event loop stays responsive), asks
the engine whether the request fits its context and its queue, and only then hands a ``PreparedRequest``
to the ``AsyncEngine``. The engine thread owns the model and the KV cache; a stream the client leaves is
closed, which aborts its engine requests and frees their KV blocks at once.

Trace of one streamed chat request::

    POST /v1/chat/completions  -> ChatCompletionRequest (strict pydantic; 400 names the field)
      -> MediaFetcher.fetch(url) for each image (data:, http(s) with address checks, allowed files)
      -> worker thread: decode_image (pixel limit) -> InputProcessor.prepare (template, tiles, tokens)
      -> AsyncEngine.max_new_tokens_for (the engine's context rule: 400 before any streaming)
      -> AsyncEngine.check_room(n) (the engine's queue limit: 503 before any streaming)
      -> n x AsyncEngine.generate(...) merged -> SSE chunks ... data: [DONE]
"""

from __future__ import annotations

from . import chat, completions, health, models, responses, tokenize

ROUTERS = (health.router, models.router, chat.router, completions.router, responses.router, tokenize.router)

__all__ = ["ROUTERS"]
