"""Typed FastAPI dependencies: routes declare what they need, never reach into `app.state`.

@router.get("/v1/model")
async def model(service: ServiceDep) -> dict: ...
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.tokenizer import TokenizerService


def get_service(request: Request) -> TokenizerService:
    """The app's one TokenizerService (made by service.app.create_app)."""
    return request.app.state.service


ServiceDep = Annotated[TokenizerService, Depends(get_service)]
