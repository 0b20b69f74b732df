"""One writer per output (io/lease.py): a second run of an output is refused while the first
holds its lease, a dead holder's lease is taken over, a run that lost its lease does not commit.
The stores are real: a local folder, and the local S3 server's conditional writes; the last
tests race two real CLI runs on one output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from augment_ray.config.base import StorageOptions
from augment_ray.errors import LeaseLostError, OutputLeasedError
from augment_ray.io.lease import LeaseRecord, OutputLease
from augment_ray.io.lease_stores import lease_store
from augment_ray.storage import location

CLI = [sys.executable, "-m", "augment_ray.cli"]


def s3_output(local_s3, prefix: str):
    storage = StorageOptions(endpoint=local_s3.endpoint, region="us-east-1",
                             access_key_id_env=local_s3.key_id_env,
                             secret_access_key_env=local_s3.secret_env)
    return location(f"s3://{local_s3.bucket}/{prefix}", storage)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return location(str(tmp_path / "out"), None)
    return s3_output(request.getfixturevalue("local_s3"), f"lease-{time.time_ns()}")


def stale_record(run_id: str, host: str, age_s: float, pid: int = 1) -> bytes:
    then = time.time() - age_s
    return LeaseRecord(run_id, "other-job", host, pid, None, then, then, 5.0).to_bytes()


def test_a_second_run_is_refused_naming_the_holder_then_gets_the_lease(output):
    first = OutputLease(output, "run-first", "nightly", timeout_s=60)
    with first.held():
        second = OutputLease(output, "run-second", "nightly", timeout_s=60)
        with pytest.raises(OutputLeasedError) as refused:
            second.acquire()
        message = str(refused.value)
        assert "run-first" in message and socket.gethostname() in message
        assert "lease_timeout_s" in message and "did not start" in message
        first.check()  # still ours
    assert lease_store(output).read() is None  # released after the run
    with OutputLease(output, "run-second", "nightly", timeout_s=60).held():
        assert json.loads(lease_store(output).read().data)["run_id"] == "run-second"


class AnswerLost:
    """A real store whose conditional writes go through but whose answers are lost, so the
    client's retry is refused (412): what a connection reset after the server acted looks like
    to the client (measured: benchmarks/s3_faults.py lost leases this way before the fix)."""

    def __init__(self, store) -> None:
        self.store = store

    def create(self, data: bytes):
        self.store.create(data)
        return None

    def replace(self, data: bytes, token: str):
        self.store.replace(data, token)
        return None

    def __getattr__(self, name: str):
        return getattr(self.store, name)


def test_a_lease_write_whose_answer_was_lost_is_still_ours(output):
    lease = OutputLease(output, "run-a", "nightly", timeout_s=60,
                        store=AnswerLost(lease_store(output)))
    lease.acquire()
    assert lease.token is not None
    lease.renew()
    lease.check()  # renews once more, then checks: still ours, not lost
    assert lease.lost is None
    held = LeaseRecord.parse(lease_store(output).read().data)
    assert held.run_id == "run-a" and held.renewed_at == lease.record.renewed_at
    lease.release()
    assert lease_store(output).read() is None
    # someone else's lease is still refused through the same lost-answer store
    other = OutputLease(output, "run-c", "nightly", timeout_s=60,
                        store=AnswerLost(lease_store(output)))
    with OutputLease(output, "run-b", "nightly", timeout_s=60).held(), \
            pytest.raises(OutputLeasedError):
        other.acquire()


def test_a_lease_not_renewed_within_its_timeout_is_taken_over(output):
    store = lease_store(output)
    assert store.create(stale_record("run-dead", "another-host", age_s=2)) is not None
    fresh = OutputLease(output, "run-new", "nightly", timeout_s=60)
    with pytest.raises(OutputLeasedError, match="run-dead"):  # 2 s old, timeout 5 s: alive
        fresh.acquire()
    current = store.read()
    assert store.replace(stale_record("run-dead", "another-host", age_s=30),
                         current.token) is not None
    with fresh.held():
        assert json.loads(store.read().data)["run_id"] == "run-new"


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    output = location(str(tmp_path / "out"), None)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store = lease_store(output)
    store.create(stale_record("run-killed", socket.gethostname(), age_s=0, pid=gone.pid))
    with OutputLease(output, "run-rerun", "nightly", timeout_s=60).held():
        assert json.loads(store.read().data)["run_id"] == "run-rerun"


def test_a_run_whose_lease_was_taken_over_does_not_commit(output):
    slow = OutputLease(output, "run-stalled", "nightly", timeout_s=60)
    slow.acquire()
    store = lease_store(output)
    taker = store.replace(stale_record("run-taker", "host-b", age_s=0), store.read().token)
    assert taker is not None
    with pytest.raises(LeaseLostError, match="run-taker"):
        slow.check()
    slow.release()
    assert json.loads(store.read().data)["run_id"] == "run-taker"  # not deleted by the loser


def test_renewal_keeps_a_long_run_s_lease_fresh(tmp_path):
    output = location(str(tmp_path / "out"), None)
    with OutputLease(output, "run-long", "nightly", timeout_s=0.8).held():
        time.sleep(1.5)  # longer than the timeout: renewals every 0.2 s keep it
        record = LeaseRecord.parse(lease_store(output).read().data)
        assert not record.stale(time.time())
        with pytest.raises(OutputLeasedError):
            OutputLease(output, "run-other", "nightly", timeout_s=0.8).acquire()


# two real CLI runs of one job on one output, started together: one runs, one is refused (the
# winner holds the lease from before its Ray starts until after its commit: seconds, while the
# two start within a fraction of a second of each other)
def lease_job(tmp_path: Path, output: dict) -> Path:
    source = tmp_path / "in"
    source.mkdir()
    rows = [{"id": f"r{i}", "instruction": f"Name a colour number {i}."} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), source / "part-0.parquet")
    job = {"name": "lease-race", "input": {"uri": str(source)}, "output": output,
           "steps": [{"kind": "dedup_exact"}]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.integration
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_concurrent_cli_runs_one_writes_the_other_is_refused(where, tmp_path, request):
    output: dict = {"uri": str(tmp_path / "out")}
    if where == "s3":
        local_s3 = request.getfixturevalue("local_s3")
        output = {"uri": f"s3://{local_s3.bucket}/race-{time.time_ns()}",
                  "storage": {"endpoint": local_s3.endpoint, "region": "us-east-1",
                              "access_key_id_env": local_s3.key_id_env,
                              "secret_access_key_env": local_s3.secret_env}}
    job_file = lease_job(tmp_path, output)
    env = {**os.environ, "RAY_ADDRESS": ""}
    runs = [subprocess.Popen([*CLI, "run", str(job_file)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    # communicate, not wait: a child whose output fills its pipe would never exit
    done = [(run.returncode, out, err) for run in runs
            for out, err in [run.communicate(timeout=600)]]
    codes = sorted(code for code, _, _ in done)
    assert codes == [0, 1], [err[-2000:] for _, _, err in done]
    refused = next(err for code, _, err in done if code == 1)
    assert "is being written by another run" in refused and "Traceback" not in refused
    loc = location(output["uri"], output.get("storage") and StorageOptions(**output["storage"]))
    with loc.fs.open_input_stream(loc.join("_SUCCESS").path) as stream:
        winner = json.loads(stream.read())["run_id"]
    assert winner in refused  # it named the run that wrote the output
    assert lease_store(loc).read() is None  # given back after the commit
