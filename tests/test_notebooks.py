"""notebooks/explore.ipynb runs end to end on a real run's output: the real refine job with the
bundled model on local Ray writes a small output, then nbclient executes every cell of the
notebook against it in a fresh kernel of this venv's Python."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from augment_ray.config.job import JobSpec, parse_job
from augment_ray.pipeline import run_job

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "explore.ipynb"
EXAMPLE = ROOT / "jobs" / "refine_seed_tasks.yaml"
SAMPLE = ROOT / "jobs" / "data" / "self_instruct_seed"
KERNEL = "augment-ray-test-venv"
SEED_ROWS = 24


def small_refine_job(source: Path, out: Path) -> JobSpec:
    """The example job (refine with the bundled model), made small: 16 tokens, batches of 4."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data["input"]["uri"] = str(source)
    data["output"]["uri"] = str(out)
    engine = data["engines"]["small"]
    engine.update(batch_size=4, replicas=1, num_cpus=1)
    engine["sampling"]["max_tokens"] = 16
    # 16-token rewrites fail the checks (tests/test_checks_job.py): this is about the notebook
    data["steps"][0]["checks"] = False
    return parse_job(data)


def venv_kernelspec(jupyter_dir: Path) -> None:
    """A kernelspec that starts ipykernel with this interpreter (the venv's), in a private
    JUPYTER_PATH folder, so that no user- or system-wide 'python3' spec can pick another one."""
    spec = jupyter_dir / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "augment-ray venv (test)",
        "language": "python",
    }))


def cell_text(cell) -> str:
    """Everything a code cell printed or displayed as text."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


def test_explore_notebook_runs_on_a_real_run(local_ray, tmp_path, monkeypatch):
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    rows = pq.read_table(SAMPLE).slice(0, SEED_ROWS).to_pylist()
    source = tmp_path / "in"
    source.mkdir()
    bad = {**rows[0], "id": "bad-null", "instruction": None}  # one row for _rejects/
    pq.write_table(pa.Table.from_pylist([*rows, bad]), source / "part-0.parquet")
    out = tmp_path / "out"
    summary = run_job(small_refine_job(source, out))
    assert (summary["rows_out"], summary["rows_rejected"]) == (SEED_ROWS, 1)

    venv_kernelspec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    assert KernelSpecManager().get_kernel_spec(KERNEL).argv[0] == sys.executable
    monkeypatch.setenv("AUGMENT_RAY_OUTPUT", str(out))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("RAY_ADDRESS", "MPLBACKEND", "AUGMENT_RAY_REFINED_COLUMN"):
        monkeypatch.delenv(name, raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells
                   if c.cell_type == "code"), "commit the notebook without outputs"
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint('kernel python', sys.executable)"))
    try:
        NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:  # the executed copy, for a look after a failure
        nbformat.write(nb, tmp_path / "explore.executed.ipynb")

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o["output_type"] == "error"]
    assert f"kernel python {sys.executable}" in cell_text(code[-1])
    text = "\n".join(cell_text(c) for c in code)
    assert f"{SEED_ROWS} kept rows, 1 rejected rows" in text
    assert "missing_instruction" in text  # the rejections table
    assert f"{{'refine': {SEED_ROWS}}}" in text  # the side-by-side pairs, by step
    embedded = re.search(r"(\d+) seed and (\d+) augmented texts, 384-dim", text)
    assert embedded and int(embedded[1]) == SEED_ROWS and int(embedded[2]) >= 1
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the length histograms and the embedding map
    map_cell = next(c for c in code if "h.project_2d" in c.source)
    assert any("image/png" in o.get("data", {}) for o in map_cell.outputs)

    diversity = next(c for c in code if "h.vendi_score" in c.source)
    printed = cell_text(diversity)
    numbers = {}
    for name in ("seed", "augmented", "seed + augmented"):
        line = next(line for line in printed.splitlines() if line.startswith(f"{name}  "))
        numbers[name] = [float(x) for x in line[len(name):].split()]
    for name, (count, distance, vendi) in numbers.items():
        assert count >= 2, name
        assert 0.0 < distance <= 1.5, (name, distance)
        assert 1.0 <= vendi <= count + 1e-6, (name, vendi)
    print("diversity:\n" + printed)
