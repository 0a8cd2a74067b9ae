"""Request bodies, bounded by pydantic so an oversized or malformed request is a 400 naming the field."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

_TEXT = 200_000  # characters in one message or prompt
_USER = r"^[A-Za-z0-9_.@:-]{1,128}$"
_Stop = Annotated[str, Field(max_length=64)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=_TEXT)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]] = Field(max_length=_TEXT)
    name: Optional[str] = Field(None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=128)
    max_tokens: Optional[int] = Field(None, ge=1, le=1_000_000)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # at most 4 stop strings of at most 64 characters: each is matched against the answer at every token
    stop: Union[_Stop, Annotated[list[_Stop], Field(max_length=4)], None] = None
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    user: Optional[str] = Field(None, pattern=_USER)
    # OpenAI fields this server does not implement: refused with a 400 naming them, never silently ignored
    tools: Optional[Any] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[Any] = None
    functions: Optional[Any] = None
    presence_penalty: float = Field(0, ge=-2, le=2)
    frequency_penalty: float = Field(0, ge=-2, le=2)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=512)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=1_000_000)
    logprobs: Optional[bool] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]] = Field(max_length=_TEXT)
    echo: bool = False
    logprobs: Optional[int] = None


class GenerateRequest(BaseModel):
    """The seed's simple endpoint: a prompt in, a reply out (chat template applied)."""

    prompt: str = Field(min_length=1, max_length=_TEXT)
    max_tokens: int = Field(100, ge=1, le=1_000_000)
    temperature: float = Field(0.7, ge=0, le=2)
    model: Optional[str] = Field(None, max_length=128)
    user: Optional[str] = Field(None, pattern=_USER)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = Field(None, max_length=200)
    expertise: Optional[str] = Field(None, max_length=200)
    interests: list[str] = Field(default_factory=list, max_length=32)
    tone: Optional[str] = Field(None, max_length=100)
    language: Optional[str] = Field(None, max_length=50)
    notes: Optional[str] = Field(None, max_length=2000)


class AdapterLoad(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    path: str = Field(min_length=1, max_length=4096)
