"""A real multi-node Ray cluster (tests/ray_cluster.py): a head and a second node whose custom
resource `llm_node` is where the engine actors must go. A job submitted with `augment-ray submit`
reads shards from the local S3 server, refines on the second node with the bundled model, dedups
and writes back to S3. Then the faults a nightly run meets on a real cluster: the second node
lost mid-step (a reclaimed spot node) and replaced, and the driver killed under `ray job submit`
and the date submitted again. Every row accounted for, the output equal to an uninterrupted
run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from ray_cluster import LocalRayCluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "augment_ray.cli"]
DS = "2026-12-01"
LLM_NODE = {"llm_node": 1.0}
ROWS = 24


@pytest.fixture(scope="module")
def cluster(local_s3) -> Iterator[LocalRayCluster]:
    """Head (2 CPUs, runs the driver and Ray Data's tasks) + a 1-CPU node offering llm_node.
    Started after local_s3: its workers see only the dummy AWS credentials."""
    ray_cluster = LocalRayCluster(head_cpus=2).start()
    try:
        ray_cluster.add_node("llm", num_cpus=1, resources=LLM_NODE)
        yield ray_cluster
    finally:
        ray_cluster.stop()


def llm_node(cluster: LocalRayCluster):
    return next(node for node in reversed(cluster.nodes) if node.resources and node.alive())


def sample_rows() -> list[dict]:
    """ROWS seed tasks, the last four exact copies of others (dedup_exact rejects them)."""
    rows = pq.read_table(ROOT / "jobs" / "data" / "self_instruct_seed").slice(0, ROWS - 4)
    rows = rows.select(["id", "instruction"]).to_pylist()
    return rows + [{"id": f"copy-{i}", "instruction": rows[i]["instruction"]} for i in range(4)]


def job_spec(name: str, input_uri: str, output_uri: str, storage: dict | None = None) -> dict:
    io = {"storage": storage} if storage else {}
    return {
        "name": name,
        "input": {"uri": input_uri, **io},
        "output": {"uri": output_uri, **io},
        "engines": {"small": {"kind": "transformers", "model": "bundled", "num_cpus": 1,
                              "threads": 1, "batch_size": 2, "resources": LLM_NODE,
                              "sampling": {"max_tokens": 8}}},
        # 8-token rewrites fail the checks (tests/test_checks_job.py tests those)
        "steps": [{"kind": "refine", "engine": "small", "checks": False},
                  {"kind": "dedup_exact"}],
    }


def write_job(folder: Path, spec: dict) -> Path:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def local_input(folder: Path) -> Path:
    source = folder / "in"
    source.mkdir(parents=True, exist_ok=True)
    rows = sample_rows()
    for shard in range(2):
        pq.write_table(pa.Table.from_pylist(rows[shard::2]), source / f"part-{shard}.parquet")
    return source


def read_rows(folder: Path) -> dict[str, dict]:
    files = sorted(folder.glob("*.parquet"))
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []
    # attempts are per-attempt bookkeeping; everything else must be equal between runs
    return {row["id"]: {k: v for k, v in row.items() if k != "refine_attempts"} for row in rows}


def journaled(folder: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in folder.glob("[!.]*.parquet"))


def run_cli(cluster: LocalRayCluster, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**cluster.env}, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    """The run's output once it ends; a run still going after `timeout` is killed and fails
    the test (a hung run must not hold the suite)."""
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"the run did not finish in {timeout:.0f}s:\n{out[-3000:]}")
    return out


def wait_for_answers(folder: Path, at_least: int, process: subprocess.Popen | None = None,
                     timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while journaled(folder) < at_least:
        assert process is None or process.poll() is None, "the run ended before the fault"
        assert time.monotonic() < deadline, f"fewer than {at_least} answers journaled"
        time.sleep(0.2)


def assert_same_output(whole: Path, other: Path) -> None:
    for folder in ("data", "_rejects"):
        a, b = read_rows(whole / folder), read_rows(other / folder)
        assert a == b, folder
    assert len(read_rows(other / "data")) + len(read_rows(other / "_rejects")) == ROWS


def test_submitted_job_reads_and_writes_s3_with_engine_actors_on_the_second_node(
        cluster, local_s3, tmp_path):
    client = local_s3.client()
    rows = sample_rows()
    for shard in range(2):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows[shard::2]), sink)
        client.put_object(Bucket=local_s3.bucket, Key=f"multinode/raw/dt={DS}/part-{shard}.parquet",
                          Body=sink.getvalue().to_pybytes())
    storage = {"endpoint": local_s3.endpoint, "region": "us-east-1", "addressing": "path",
               "access_key_id_env": local_s3.key_id_env,
               "secret_access_key_env": local_s3.secret_env}
    base = f"s3://{local_s3.bucket}/multinode"
    job = write_job(tmp_path, job_spec("multinode", f"{base}/raw/dt={{ds}}/",
                                       f"{base}/out/dt={{ds}}/", storage))

    submitted = subprocess.run(
        [*CLI, "submit", str(job), "--address", cluster.dashboard_url, "--ds", DS, "--wait",
         "--working-dir", str(tmp_path), "--env", local_s3.key_id_env,
         "--env", local_s3.secret_env],
        capture_output=True, text=True, timeout=600, check=False, env=cluster.env)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    assert f"augment-multinode-{DS}: SUCCEEDED" in submitted.stdout
    assert "Traceback" not in output

    prefix = f"multinode/out/dt={DS}/"
    listed = client.list_objects_v2(Bucket=local_s3.bucket, Prefix=prefix)["Contents"]
    names = {item["Key"][len(prefix):] for item in listed}
    assert {"_SUCCESS", "_manifest.json", "_summary.json"} <= names
    summary = json.loads(client.get_object(Bucket=local_s3.bucket,
                                           Key=f"{prefix}_summary.json")["Body"].read())
    assert summary["rows_in"] == ROWS
    assert summary["rows_out"] + summary["rows_rejected"] == ROWS
    dedup = next(step for step in summary["steps"] if step["name"] == "dedup_exact")
    assert dedup["rejected"] == {"exact_duplicate": 4}
    # the refine actors ran on the llm node, and only there
    head, second = cluster.nodes[0], llm_node(cluster)
    assert summary["placement"] == {"refine": {second.node_id: 1}}
    assert head.node_id != second.node_id
    kept = [name for name in names if name.startswith("data/") and name.endswith(".parquet")]
    table = pa.concat_tables([pq.read_table(pa.BufferReader(client.get_object(
        Bucket=local_s3.bucket, Key=prefix + name)["Body"].read())) for name in kept])
    assert len(table) == summary["rows_out"]
    assert len(set(table["id"].to_pylist())) == len(table)


@dataclass(frozen=True)
class Uninterrupted:
    output: Path
    seconds: float


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> Uninterrupted:
    """The local-disk job run once on the cluster without faults: what every faulted run's
    output must equal, and how long it took."""
    folder = tmp_path_factory.mktemp("whole")
    source = local_input(folder)
    job = write_job(folder, job_spec("whole", str(source), str(folder / "out")))
    started = time.perf_counter()
    process = run_cli(cluster, "run", str(job), "--ray-address", cluster.gcs_address)
    out = finish(process)
    assert process.returncode == 0, out[-4000:]
    return Uninterrupted(folder / "out", time.perf_counter() - started)


def test_losing_the_llm_node_mid_step_then_rerunning_gives_the_uninterrupted_output(
        cluster, uninterrupted, tmp_path):
    source = local_input(tmp_path)
    output = tmp_path / "out"
    job = write_job(tmp_path, job_spec("node-loss", str(source), str(output)))
    started = time.perf_counter()
    run = run_cli(cluster, "run", str(job), "--ray-address", cluster.gcs_address)
    wait_for_answers(output / "_work" / "refine", 6, run)
    lost = llm_node(cluster)
    cluster.kill_node(lost)  # SIGKILL: raylet, object store and the engine actor at once
    assert not cluster.processes_of(lost)
    replacement = cluster.add_node("llm-2", num_cpus=1, resources=LLM_NODE)
    out = finish(run)
    first_wall = time.perf_counter() - started
    assert "Traceback" not in out
    if run.returncode != 0:
        # failing is allowed, with one paragraph that names what was lost
        assert "error: Part of the Ray cluster was lost" in out or \
            "error: An engine actor died" in out, out[-4000:]
        rerun = run_cli(cluster, "run", str(job), "--ray-address", cluster.gcs_address)
        out = finish(rerun)
        assert rerun.returncode == 0, out[-4000:]
        assert "resuming it" in out
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["rows_out"] + summary["rows_rejected"] == ROWS
    assert_same_output(uninterrupted.output, output)
    # wherever the actors ran, the replacement node served the end of the step
    assert replacement.node_id in summary["placement"]["refine"]
    counts = summary["journal"]["refine"]
    assert counts["replayed"] + counts["generated"] == ROWS
    print(json.dumps({"node_loss": {
        "uninterrupted_s": round(uninterrupted.seconds, 1),
        "first_attempt_s": round(first_wall, 1), "completed_without_rerun": run.returncode == 0,
        "wall_s": round(time.perf_counter() - started, 1), "journal": counts,
        "placement": summary["placement"]}}))


def driver_pids(job_file: str) -> list[int]:
    """The job's driver: `python -m augment_ray.cli run JOB` started by Ray's job supervisor."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [word.decode(errors="replace") for word in cmdline]
        if "augment_ray.cli" in words and "run" in words and job_file in words:
            pids.append(int(entry.name))
    return pids


def test_killing_the_driver_under_ray_job_submit_then_resubmitting_resumes(
        cluster, uninterrupted, tmp_path):
    source = local_input(tmp_path)
    output = tmp_path / "out"
    job = write_job(tmp_path, job_spec("driver-loss", str(source), str(output)))
    submit = [*CLI, "submit", job.name, "--address", cluster.dashboard_url, "--ds", DS,
              "--working-dir", str(tmp_path)]
    first = subprocess.run(submit, capture_output=True, text=True, timeout=300, check=False,
                           env=cluster.env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    submission = f"augment-driver-loss-{DS}"
    assert f"Submitted {submission}" in first.stdout

    wait_for_answers(output / "_work" / "refine", 6)
    pids = driver_pids(job.name)
    assert pids, "the job's driver process was not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    deadline = time.monotonic() + 120
    while str(client.get_job_status(submission).value) not in ("FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "the killed driver's job did not end"
        time.sleep(0.5)
    assert not (output / "_SUCCESS").exists()
    journaled_before = journaled(output / "_work" / "refine")

    # the date again: the failed submission is retried under the next id, and resumes
    started = time.perf_counter()
    again = subprocess.run([*submit, "--wait"], capture_output=True, text=True, timeout=600,
                           check=False, env=cluster.env, cwd=tmp_path)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert f"{submission}-2: SUCCEEDED" in again.stdout
    assert "resuming it" in out and "Traceback" not in out
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["journal"]["refine"]["replayed"] >= journaled_before >= 6
    assert_same_output(uninterrupted.output, output)
    print(json.dumps({"driver_loss": {
        "uninterrupted_s": round(uninterrupted.seconds, 1),
        "resubmitted_s": round(time.perf_counter() - started, 1),
        "journaled_when_killed": journaled_before, "journal": summary["journal"]["refine"]}}))
