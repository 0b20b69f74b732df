"""A whole job on object storage: sharded Parquet in a real local S3-compatible server, read and
written by Ray workers, path-style (s3://) and virtual-hosted (oss://)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from augment_ray.config.job import parse_job
from augment_ray.pipeline import run_job
from augment_ray.storage import location

pytestmark = pytest.mark.integration



@pytest.fixture
def fresh_ray(local_s3):
    """Ray started after the fixture put the credentials in the environment: local workers
    inherit the environment of the Ray they belong to."""
    if ray.is_initialized():
        ray.shutdown()
    yield
    ray.shutdown()


@pytest.mark.parametrize(
    ("scheme", "addressing", "host"), [("s3", "path", "127.0.0.1"), ("oss", "virtual", "localhost")]
)
def test_job_reads_and_writes_sharded_parquet_in_a_bucket(local_s3, fresh_ray, scheme,
                                                          addressing, host):
    client = local_s3.client()
    prefix = f"job-{scheme}"
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(10)]
    rows[3]["instruction"] = None
    for shard in range(2):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows[shard * 5 : shard * 5 + 5]), sink)
        client.put_object(Bucket=local_s3.bucket, Key=f"{prefix}/in/part-{shard}.parquet",
                          Body=sink.getvalue().to_pybytes())
    storage = {
        "endpoint": f"http://{host}:{local_s3.port}",
        "region": "us-east-1",
        "addressing": addressing,
        "access_key_id_env": local_s3.key_id_env,
        "secret_access_key_env": local_s3.secret_env,
    }
    base = f"{scheme}://{local_s3.bucket}/{prefix}"
    job = parse_job({
        "name": "s3-roundtrip",
        "input": {"uri": f"{base}/in/", "storage": storage},
        "output": {"uri": f"{base}/out/", "storage": storage},
    })

    summary = run_job(job)

    assert (summary["rows_in"], summary["rows_out"], summary["rows_rejected"]) == (10, 9, 1)
    keys = sorted(item["Key"] for item in
                  client.list_objects_v2(Bucket=local_s3.bucket,
                                         Prefix=f"{prefix}/out/")["Contents"])
    assert f"{prefix}/out/_SUCCESS" in keys
    manifest = json.loads(client.get_object(Bucket=local_s3.bucket,
                                            Key=f"{prefix}/out/_manifest.json")["Body"].read())
    out = location(job.output.uri, job.output.storage)
    kept = pa.concat_tables(
        pq.read_table(out.join(name).path, filesystem=out.fs) for name in manifest["files"]
    )
    rejected = pa.concat_tables(
        pq.read_table(out.join(name).path, filesystem=out.fs)
        for name in manifest["reject_files"]
    )
    assert sorted(kept["output"].to_pylist()) == sorted(
        r["output"] for r in rows if r["instruction"]
    )
    assert rejected["reject_reason"].to_pylist() == ["missing_instruction"]
    for name in ("_manifest.json", "_summary.json"):
        text = client.get_object(Bucket=local_s3.bucket, Key=f"{prefix}/out/{name}")["Body"].read()
        assert local_s3.secret_access_key.encode() not in text
        assert local_s3.access_key_id.encode() not in text
    if addressing == "virtual":
        assert any(h.startswith(f"{local_s3.bucket}.localhost") for h, _ in local_s3.requests)
