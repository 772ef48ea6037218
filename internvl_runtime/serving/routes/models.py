"""``/v1/models``: the served model, once per name it is served under (``--served-model-name a b``), each card as
vLLM's: the context length (``max_model_len``), ``root`` (the checkpoint it was loaded from) and ``parent``
(null: no adapters here)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..protocol import ModelCard, ModelList, dump
from ..state import ServingState
from .common import check_model, serving_state

router = APIRouter()


def _card(state: ServingState, name: str) -> ModelCard:
    """The card of ``name``, with vLLM's ``root`` and ``parent`` (response models keep extra fields)."""
    return ModelCard.model_validate({"id": name, "max_model_len": state.max_model_len,
                                     "root": state.config.model or name, "parent": None})


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = serving_state(request)
    return JSONResponse(dump(ModelList(data=[_card(state, name) for name in state.config.model_names])))


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    state = serving_state(request)
    check_model(state, model_id)
    return JSONResponse(dump(_card(state, model_id)))
