"""Connected components of a duplicate graph, labelled by their smallest row id."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from augment_ray.curate.hashing import as_array

KEEPER_SCHEMA = pa.schema([("id", pa.string()), ("keeper", pa.string())])


def components(a: pa.Array | pa.ChunkedArray, b: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Edges a[i]-b[i] between row ids -> (id, keeper) for every id that is not the smallest id
    of its component. Min-label propagation with pointer jumping, all in numpy: each round
    spreads the smaller label over every edge, then shortcuts label chains."""
    if len(a) == 0:
        return KEEPER_SCHEMA.empty_table()
    a, b = as_array(a), as_array(b)
    both = pa.concat_arrays([a, b])
    nodes = pc.unique(both)
    nodes = nodes.take(pc.sort_indices(nodes))  # index order == id order, so min label == min id
    left = pc.index_in(a, value_set=nodes).to_numpy(zero_copy_only=False)
    right = pc.index_in(b, value_set=nodes).to_numpy(zero_copy_only=False)
    label = np.arange(len(nodes))
    while True:
        before = label.copy()
        low = np.minimum(label[left], label[right])
        np.minimum.at(label, left, low)
        np.minimum.at(label, right, low)
        while True:  # pointer jumping: label[x] <- label[label[x]] until fixed
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if np.array_equal(label, before):
            break
    moved = np.flatnonzero(label != np.arange(len(nodes)))
    return pa.table({"id": nodes.take(pa.array(moved)),
                     "keeper": nodes.take(pa.array(label[moved]))}, schema=KEEPER_SCHEMA)
