"""Serving: a continuous-batching engine over paged KV caches (`Engine`), its asyncio front
(`AsyncEngine`), and per-request `SamplingParams` with vLLM's names."""

from dspark_jax.serving.async_engine import AsyncEngine
from dspark_jax.serving.engine import Engine, EngineFull, EngineStats
from dspark_jax.serving.params import RequestOutput, SamplingParams

__all__ = ["AsyncEngine", "Engine", "EngineFull", "EngineStats", "RequestOutput", "SamplingParams"]
