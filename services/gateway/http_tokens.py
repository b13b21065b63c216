"""vLLM's utility endpoints on the gateway's HTTP API, in vLLM's request and response shapes:

  POST /tokenize    {"prompt": str, "add_special_tokens": bool} or {"messages": [...]}
                    -> {"count", "max_model_len", "tokens"}  (messages: the chat template with the
                    generation prompt, exactly the ids a chat completion would be prefilled with)
  POST /detokenize  {"tokens": [int, ...]} -> {"prompt": str}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common.errors import InvalidRequest
from services.gateway.openai_schema import ChatMessage, error_body
from services.gateway.text import PromptEncoder
from services.gateway.tools import tools_from_openai


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Any] | None = None  # with messages: rendered by the chat template, as a chat request's
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


@dataclass(frozen=True, slots=True)
class TokenRoutes:
    """What the routes need from the app: the tokenizer (raises when the gateway is not ready),
    the API-key check and the model-name check."""

    encoder: Callable[[], PromptEncoder]
    authorize: Callable[[Request], None]
    check_model: Callable[[str], None]

    def admit(self, request: Request, model: str | None) -> PromptEncoder:
        """The tokenizer, once the caller's key and (if named) the model are accepted."""
        self.authorize(request)
        if model is not None:
            self.check_model(model)
        return self.encoder()


def add_token_routes(app: FastAPI, routes: TokenRoutes) -> None:
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> Any:
        encoder = routes.admit(request, body.model)
        try:
            if body.messages is not None:
                tools = tools_from_openai(body.tools, None)
                ids = encoder.encode_chat([m.turn() for m in body.messages], None if tools is None else tools.offered)
            else:
                ids = list(encoder.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens))
        except InvalidRequest as error:
            param = "tools" if str(error).startswith("tools") else "messages" if body.messages else "prompt"
            return JSONResponse(error_body(400, str(error), param), 400)
        return {"count": len(ids), "max_model_len": encoder.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
        encoder = routes.admit(request, body.model)
        vocab = len(encoder.tokenizer)
        bad = next((i for i, token in enumerate(body.tokens) if not 0 <= token < vocab), None)
        if bad is not None:
            return JSONResponse(error_body(400, f"tokens[{bad}]={body.tokens[bad]} is outside the vocabulary "
                                                f"of {vocab}", "tokens"), 400)
        return {"prompt": encoder.tokenizer.decode(body.tokens)}
