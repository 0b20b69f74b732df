"""Model engines: one protocol (`Engine.generate`), several backends."""

from augment_ray.engines.base import Completion, Engine, GenerationFailure, build_engine

__all__ = ["Completion", "Engine", "GenerationFailure", "build_engine"]
