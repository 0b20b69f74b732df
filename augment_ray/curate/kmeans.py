"""Spherical k-means and similar pairs inside a cluster, in numpy (dedup_semantic's arithmetic).

Vectors are unit length, so similarity is a dot product: k-means assigns each vector to the
centroid with the largest dot product and a centroid is the normalized mean of its vectors.
Everything here depends only on the rows it is given and their order; callers sort by id.
"""

from __future__ import annotations

import math

import numpy as np

# rows of x multiplied at once: bounds a (chunk x k) or (tile x tile) score block
CHUNK = 4096
TILE = 2048
# training rows per centroid (faiss warns below 39 and samples at most 256 per centroid)
SAMPLE_PER_CLUSTER = 40
MIN_SAMPLE = 10_000
# Lloyd stops once fewer than this share of the training rows change cluster
TOLERANCE = 1e-3
# candidate edges kept before they are folded into a spanning star (same components)
EDGE_BUDGET = 2_000_000


def default_clusters(rows: int) -> int:
    """k for `rows` vectors: rows / 1000 up to a million rows (clusters of ~1000, so the pair
    search costs ~1000 dot products a row and small inputs compare every pair: no pair is lost
    at a cluster border), sqrt(rows) above, which balances assignment (rows x k) against the
    pair search (rows x rows / k)."""
    return max(1, round(min(rows / 1000, math.sqrt(rows))))


def training_rows(rows: int, k: int) -> int:
    """How many rows train the centroids (all of them for small inputs)."""
    return min(rows, max(SAMPLE_PER_CLUSTER * k, MIN_SAMPLE))


def unit(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to length 1 (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1).astype(np.float32)


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the centroid with the largest dot product, per row (first one on a tie)."""
    out = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), CHUNK):
        block = np.asarray(x[start:start + CHUNK], dtype=np.float32)
        out[start:start + CHUNK] = np.argmax(block @ centroids.T, axis=1)
    return out


def nearest_two(x: np.ndarray, centroids: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nearest centroid, second nearest, how much larger the nearest's dot product is) per
    row; with one centroid the second is the first and the gap infinite."""
    n = len(x)
    first = np.empty(n, dtype=np.int64)
    second = np.empty(n, dtype=np.int64)
    gap = np.full(n, np.inf, dtype=np.float32)
    rows = np.arange(min(n, CHUNK))
    for start in range(0, n, CHUNK):
        scores = np.asarray(x[start:start + CHUNK], dtype=np.float32) @ centroids.T
        here = rows[:len(scores)]
        best = np.argmax(scores, axis=1)
        first[start:start + CHUNK] = best
        if centroids.shape[0] < 2:
            second[start:start + CHUNK] = best
            continue
        top = scores[here, best]
        scores[here, best] = -np.inf
        runner = np.argmax(scores, axis=1)
        second[start:start + CHUNK] = runner
        gap[start:start + CHUNK] = top - scores[here, runner]
    return first, second, gap


def spherical_kmeans(x: np.ndarray, k: int, seed: int, max_iterations: int
                     ) -> tuple[np.ndarray, int]:
    """(centroids (k' x d, float32, unit), iterations run). Lloyd's algorithm from k rows picked
    by a seeded generator; stops when fewer than TOLERANCE of the rows change cluster. An empty
    cluster keeps its centroid. k' = min(k, rows)."""
    x = unit(x)
    k = max(1, min(k, len(x)))
    rng = np.random.default_rng(seed)
    centroids = x[np.sort(rng.choice(len(x), size=k, replace=False))].copy()
    labels = np.full(len(x), -1, dtype=np.int64)
    iterations = 0
    while iterations < max_iterations:
        iterations += 1
        new = nearest(x, centroids)
        changed = np.count_nonzero(new != labels)
        labels = new
        if changed <= TOLERANCE * len(x):
            break
        order = np.argsort(labels, kind="stable")
        ordered = labels[order]
        starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
        # float32 sums: 6x faster than reduceat in float64 or a float64 cumsum (measured)
        sums = np.add.reduceat(x[order], starts, axis=0)
        norms = np.linalg.norm(sums, axis=1)
        filled = norms > 0
        centroids[ordered[starts][filled]] = sums[filled] / norms[filled, None]
    return centroids, iterations


def label_components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Edges left[i]-right[i] over nodes 0..n-1 -> per node the smallest node of its component
    (min-label propagation with pointer jumping, as curate.components does for ids)."""
    label = np.arange(n)
    if not len(left):
        return label
    while True:
        before = label.copy()
        low = np.minimum(label[left], label[right])
        np.minimum.at(label, left, low)
        np.minimum.at(label, right, low)
        while True:
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if np.array_equal(label, before):
            return label


def similar_groups(x: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """(label per row: the smallest row index it is linked to through pairs with dot product >=
    threshold; pairs found). Tiles of the upper triangle, so memory stays TILE x TILE."""
    n = len(x)
    pairs = 0
    lefts: list[np.ndarray] = []
    rights: list[np.ndarray] = []
    held = 0
    for i in range(0, n, TILE):
        block = x[i:i + TILE]
        for j in range(i, n, TILE):
            scores = block @ x[j:j + TILE].T
            if i == j:
                scores = np.triu(scores, 1)  # each pair once, never a row with itself
            a, b = np.nonzero(scores >= threshold)
            if not len(a):
                continue
            pairs += len(a)
            lefts.append(a + i)
            rights.append(b + j)
            held += len(a)
            if held > EDGE_BUDGET:  # a star per component links the same rows
                label = label_components(n, np.concatenate(lefts), np.concatenate(rights))
                moved = np.flatnonzero(label != np.arange(n))
                lefts, rights, held = [moved], [label[moved]], len(moved)
    if not lefts:
        return np.arange(n), 0
    return label_components(n, np.concatenate(lefts), np.concatenate(rights)), pairs
