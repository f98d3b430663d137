"""Wire types of the OpenAI embeddings API (``POST /v1/embeddings``).

The request is decoded once, at the edge, into :class:`EmbeddingRequest`;
out-of-range values fail there with an error naming the path
(``input[1]``). ``input`` takes OpenAI's four forms: a string, a list of
strings, a list of token ids, or a list of lists of token ids;
:func:`inputs` gives them as one list, one item per vector asked for.
"""

from __future__ import annotations

import base64
import binascii
import sys
from array import array
from typing import Annotated, Literal, cast

from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.protocol import ProviderPreferences, UpstreamUsage

#: OpenAI's cap on the inputs of one request.
MAX_INPUTS = 2048

Text = Annotated[str, Meta(min_length=1)]
TokenId = Annotated[int, Meta(ge=0)]
TokenIds = Annotated[list[TokenId], Meta(min_length=1)]
EncodingFormat = Literal["float", "base64"]

#: One request's inputs, one item per vector: texts, or token-id lists.
Inputs = list[str] | list[list[int]]

#: The parameters an endpoint may or may not take (``encoding_format`` is not
#: one: the gateway converts an answer the upstream sent as floats).
EMBEDDING_PARAMETERS: tuple[str, ...] = ("dimensions", "user")

#: Never dropped: a vector of another size is another answer. An endpoint
#: takes ``dimensions`` only where its ``supported_parameters`` list it.
EMBEDDING_STRICT_PARAMETERS: frozenset[str] = frozenset({"dimensions"})

#: What an embedding endpoint takes when the catalog lists nothing for it.
EMBEDDING_DEFAULT_SUPPORTED: frozenset[str] = frozenset({"user"})


class EmbeddingRequest(Struct, kw_only=True, omit_defaults=True):
    """``POST /v1/embeddings``. Unknown fields are ignored, as for chat."""

    # msgspec takes one array type per union, so a list's items are checked
    # for one kind in :func:`inputs`.
    input: Text | Annotated[list[Text | TokenId | TokenIds], Meta(min_length=1, max_length=MAX_INPUTS)]
    model: str | UnsetType = UNSET
    models: Annotated[list[str], Meta(max_length=16)] | UnsetType = UNSET
    provider: ProviderPreferences | UnsetType = UNSET
    encoding_format: EncodingFormat | UnsetType = UNSET
    dimensions: Annotated[int, Meta(ge=1)] | UnsetType = UNSET
    user: str | UnsetType = UNSET

    @property
    def wants_base64(self) -> bool:
        return self.encoding_format == "base64"


class InputError(ValueError):
    """A list ``input`` whose items are not all of one kind: which item, and why."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message


_KINDS = {str: "a string", int: "a token id", list: "a list of token ids"}


def inputs(request: EmbeddingRequest) -> Inputs:
    """The request's inputs, one item per vector asked for; raises
    :class:`InputError` for a list that mixes strings, token ids and lists."""
    value = request.input
    if isinstance(value, str):
        return [value]
    first = type(value[0])
    for i, item in enumerate(value):
        if type(item) is not first:
            raise InputError(i, f"expected {_KINDS[first]}, as input[0] is: a list input holds items of one kind")
    if first is int:
        return [cast(list[int], value)]  # one input, in token ids
    return cast(Inputs, value)  # strings, or lists of token ids: all of one kind


# --- answers -------------------------------------------------------------------


class UpstreamEmbedding(Struct, kw_only=True):
    """One vector as an upstream sends it: floats, or base64 of float32s."""

    embedding: list[float] | str
    index: int | None = None


class UpstreamEmbeddings(Struct, kw_only=True):
    data: list[UpstreamEmbedding]
    usage: UpstreamUsage | None = None


class EmbeddingOut(Struct, kw_only=True):
    object: str = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int
    estimated_cost: float | None = None


class EmbeddingsOut(Struct, kw_only=True):
    """What the gateway answers: OpenAI's shape plus ``provider`` and the cost."""

    object: str = "list"
    data: list[EmbeddingOut]
    model: str
    provider: str
    usage: EmbeddingUsage


# --- base64, as OpenAI sends it -------------------------------------------------

_BIG_ENDIAN = sys.byteorder == "big"


def to_base64(vector: list[float]) -> str:
    """OpenAI's ``encoding_format: "base64"``: the vector as little-endian float32s."""
    packed = array("f", vector)
    if _BIG_ENDIAN:
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def from_base64(text: str) -> list[float]:
    """The floats of a base64 vector; ValueError when it is not one."""
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not base64 ({exc})") from None
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} bytes is not a whole number of float32s")
    packed = array("f")
    packed.frombytes(raw)
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tolist()
