"""Serving: a continuous-batching engine over paged KV caches (`Engine`), its asyncio fronts
(`AsyncEngine` in this process, `EngineProcess` in a child process, `EngineClient` from another process), and
per-request `SamplingParams` with vLLM's names."""

from dspark_jax.serving.async_engine import AsyncEngine, EngineClient, EngineProcess
from dspark_jax.serving.engine import Engine, EngineFull, EngineStats
from dspark_jax.serving.params import RequestOutput, SamplingParams

__all__ = ["AsyncEngine", "Engine", "EngineClient", "EngineProcess", "EngineFull", "EngineStats", "RequestOutput",
           "SamplingParams"]
