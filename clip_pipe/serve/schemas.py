"""Request and response models (pydantic), which also make the OpenAPI docs at /docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RankedLabel(BaseModel):
    label: str
    probability: float


class ImageResult(BaseModel):
    filename: str
    labels: list[RankedLabel]


class ClassifyResponse(BaseModel):
    results: list[ImageResult]


class EmbedResponse(BaseModel):
    dim: int
    embeddings: list[list[float]]


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request, plus infinity's `modality`."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] = Field(
        description="A text or a list. An item that is a data URL (data:image/png;base64,...) is an image."
    )
    model: str = Field(description="The served model's name, as GET /v1/models lists it")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as little-endian float32 bytes, base64-encoded"
    )
    modality: Literal["text", "image"] | None = Field(
        None, description="As infinity: 'image' means every input is an image, 'text' that none is"
    )
    dimensions: int | None = Field(None, description="Must be the model's embedding size, if given")
    user: str | None = Field(None, description="Accepted and ignored")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def multipart_body(properties: dict, required: list[str]) -> dict:
    schema = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def json_body(model: type[BaseModel]) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
STRINGS = {"type": "array", "items": {"type": "string"}}
