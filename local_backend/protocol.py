"""OpenAI wire types as msgspec Structs: decoded once at the HTTP edge, encoded once on the way out."""

from __future__ import annotations

import re

import msgspec


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            return ""
        return "".join(p.text or "" for p in self.content if p.type == "text")


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(msgspec.Struct):
    role: str
    content: str


class Choice(msgspec.Struct):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    object: str = "chat.completion"


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "local"
    object: str = "model"
    # Once the model has loaded (UNSET fields are left out of the JSON):
    max_model_len: int | msgspec.UnsetType = msgspec.UNSET
    #: What a request gets for each field it leaves out: the checkpoint's
    #: generation_config.json, else the OpenAI default; max_tokens is --default-max-tokens.
    sampling_defaults: dict[str, float | int] | msgspec.UnsetType = msgspec.UNSET


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_encoder = msgspec.json.Encoder()
_PATH = re.compile(r"at `\$\.([A-Za-z_]+)")


def decode_request(body: bytes) -> ChatCompletionRequest:
    return _decoder.decode(body)


def encode(obj: msgspec.Struct) -> bytes:
    return _encoder.encode(obj)


def param_of(err: msgspec.ValidationError) -> str | None:
    """`Expected int, got str - at `$.max_tokens`` -> "max_tokens"; also names missing fields."""
    msg = str(err)
    m = _PATH.search(msg)
    if m:
        return m.group(1)
    m = re.search(r"missing required field `([A-Za-z_]+)`", msg)
    return m.group(1) if m else None
