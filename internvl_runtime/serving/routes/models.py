"""``/v1/models``: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..protocol import ModelCard, ModelList, dump
from .common import check_model, serving_state

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = serving_state(request)
    card = ModelCard(id=state.config.model_name, max_model_len=state.max_model_len)
    return JSONResponse(dump(ModelList(data=[card])))


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    state = serving_state(request)
    check_model(state, model_id)
    return JSONResponse(dump(ModelCard(id=state.config.model_name, max_model_len=state.max_model_len)))
