"""Pipeline steps: each turns a Ray Dataset of rows into another and knows nothing else."""

from augment_ray.steps.base import Step
from augment_ray.steps.registry import build_steps

__all__ = ["Step", "build_steps"]
