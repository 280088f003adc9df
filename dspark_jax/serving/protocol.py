"""Request bodies of the OpenAI API, as pydantic models (validation and its error messages).

Only what the server implements is declared. Other OpenAI fields (`user`, `logit_bias`,
`presence_penalty`, ...) are accepted and ignored, as vLLM does, except those whose absence
would change the answer a client expects (`logprobs`, `echo`, `tools`, ...), which are refused
by name (`unsupported_fields`). `top_k`, `ignore_eos`, `stop_token_ids` and `return_token_ids`
are extensions with vLLM's names.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Stop strings are searched on the event loop for every token of every choice: bounded.
MAX_STOPS, MAX_STOP_LENGTH = 16, 256


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(BaseModel):
    model_config = ConfigDict(extra="allow")

    # the sampling fields' ranges are checked once, by dspark_jax.serving.SamplingParams
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOPS)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _nonempty_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop strings must have 1 to {MAX_STOP_LENGTH} characters")
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, ids):
        if any(i < 0 for i in ids):
            raise ValueError("token ids are >= 0")
        return ids

    @property
    def token_budget(self) -> int | None:
        """max_tokens: None asks for the rest of the context."""
        return self.max_tokens

    def unsupported_fields(self) -> list[str]:
        """Fields set to something this server does not do."""
        extra = self.model_extra or {}
        wanted = {"logprobs": extra.get("logprobs") not in (None, False, 0),
                  "top_logprobs": extra.get("top_logprobs") not in (None, 0),
                  "echo": bool(extra.get("echo")), "suffix": bool(extra.get("suffix")),
                  "best_of": extra.get("best_of") not in (None, 1, self.n),
                  "tools": bool(extra.get("tools")), "functions": bool(extra.get("functions")),
                  "response_format": (extra.get("response_format") or {"type": "text"}) != {"type": "text"}}
        return [name for name, on in wanted.items() if on]


class CompletionRequest(_Generation):
    # one prompt as text or token ids, or a list of either
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16  # the OpenAI completions default

    @field_validator("prompt")
    @classmethod
    def _nonempty_prompt(cls, prompt):
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, (str, list)) and not p for p in prompt)):
            raise ValueError("a prompt must not be empty")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) and any(t < 0 for t in prompt):
            raise ValueError("token ids are >= 0")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        return [p] if isinstance(p[0], int) else list(p)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def as_template_message(self) -> dict[str, Any]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    @property
    def token_budget(self) -> int | None:
        """max_completion_tokens, or the older max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
