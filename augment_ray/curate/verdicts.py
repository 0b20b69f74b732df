"""Write per-row verdicts of a row-local curation step back onto the batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from augment_ray.rows import live_mask, reject


def live_positions(table: pa.Table) -> np.ndarray:
    """Positions of the rows no earlier step rejected: the only rows a step may judge."""
    return np.flatnonzero(live_mask(table).to_numpy(zero_copy_only=False))


def reject_at(table: pa.Table, positions: np.ndarray, reasons: Sequence[str | None],
              details: Sequence[str | None], step: str) -> pa.Table:
    """Reject row positions[k] with reasons[k]/details[k] where reasons[k] is set."""
    all_reasons: list[str | None] = [None] * len(table)
    all_details: list[str | None] = [None] * len(table)
    for position, reason, detail in zip(positions.tolist(), reasons, details, strict=True):
        if reason is not None:
            all_reasons[position] = reason
            all_details[position] = detail
    if not any(all_reasons):
        return table
    mask = pa.array([reason is not None for reason in all_reasons])
    return reject(table, mask, step, all_reasons, all_details)
