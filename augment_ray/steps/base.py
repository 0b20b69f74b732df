"""The step contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import ray.data


class Step(ABC):
    """One stage of work on rows. A step never drops a row: it rejects it (see rows.reject), and
    it passes rows an earlier step rejected through unchanged."""

    name: str
    kind: str

    @abstractmethod
    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset: ...

    def prepare(self) -> None:  # noqa: B027 - optional hook, most steps need nothing here
        """Driver-side checks and one-time work before the run starts (e.g. find the model)."""

    def output_columns(self) -> list[str]:
        """Columns this step adds to rows."""
        return []

    def cpu_request(self) -> float:
        """CPUs this step's actors hold for the whole run (0 for plain tasks)."""
        return 0.0

    def describe(self) -> dict[str, Any]:
        """What the run summary says about this step besides its counts."""
        return {"name": self.name, "kind": self.kind}
