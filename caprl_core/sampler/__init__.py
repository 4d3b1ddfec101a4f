"""Paged KV-cache sampler: `Engine`, `SamplingParams`, `Completion` (see engine.py for the tour).

The bookkeeping modules (sequence, block_manager, scheduler) import neither torch nor transformers; the engine is
loaded lazily on first use of the names below, so `import caprl_core.sampler.block_manager` stays light.
"""

from caprl_core.sampler.sequence import Completion, SamplingParams

__all__ = ["Completion", "Engine", "EngineStats", "SamplingParams"]


def __getattr__(name: str):
    if name in ("Engine", "EngineStats"):
        from caprl_core.sampler import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'caprl_core.sampler' has no attribute {name!r}")
