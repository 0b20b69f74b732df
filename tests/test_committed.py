"""The pieces every reader and writer of an output shares (io/committed.py): the one JSON reader
and its errors, the markers, the job digest; and the env-var-name check (names.py)."""

from __future__ import annotations

import json

import pytest

from augment_ray.config.job import parse_job
from augment_ray.errors import JobSpecError, StorageError
from augment_ray.io.committed import (
    committed_files,
    has_marker,
    probe_json,
    read_json,
    spec_digest,
    spec_json,
)
from augment_ray.names import check_env_var_name, shown_env_var_name
from augment_ray.storage import location
from augment_ray.submit import SubmitPlan, plan_submission


def test_read_json_names_the_file_for_every_problem(tmp_path):
    loc = location(str(tmp_path), None)
    (tmp_path / "ok.json").write_text('{"a": 1}')
    (tmp_path / "broken.json").write_text('{"a": ')
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(loc, "ok.json") == {"a": 1}
    for name, why in (("missing.json", "Cannot read"), ("broken.json", "Cannot read"),
                      ("list.json", "not a JSON object")):
        with pytest.raises(StorageError, match=why) as caught:
            read_json(loc, name)
        assert str(tmp_path / name) in str(caught.value)
        assert probe_json(loc, name) is None  # what a check of an existing output sees
    assert has_marker(loc, "ok.json") and not has_marker(loc, "missing.json")


def test_manifest_lists_are_checked(tmp_path):
    loc = location(str(tmp_path), None)
    assert [f.path for f in committed_files(loc, {"files": ["data/a.parquet"]}, "files")] == [
        f"{tmp_path}/data/a.parquet"]
    assert committed_files(loc, {}, "reject_files", optional=True) == []
    with pytest.raises(StorageError, match="has no 'files' list"):
        committed_files(loc, {}, "files")
    with pytest.raises(StorageError, match="has no 'files' list"):
        committed_files(loc, {"files": [1]}, "files")


def job(**output):
    return parse_job({
        "name": "t", "input": {"uri": "in"}, "output": {"uri": "out", **output},
        "steps": [{"kind": "dedup_exact"}],
    })


def test_job_digest_leaves_out_the_output_mode_and_named_fields():
    assert spec_digest(job(mode="overwrite")) == spec_digest(job(mode="error-if-exists"))
    assert spec_digest(job()) != spec_digest(job(uri="elsewhere"))
    assert b'"name": "t"' in spec_json(job())
    assert b'"name": "t"' not in spec_json(job(), leave_out={"name"})
    assert spec_digest(job(), leave_out={"name"}) != spec_digest(job())


def test_env_var_names():
    assert check_env_var_name(None) is None
    assert check_env_var_name("AWS_SECRET_ACCESS_KEY") == "AWS_SECRET_ACCESS_KEY"
    assert check_env_var_name("my_key_1") == "my_key_1"
    for bad in ("", "1KEY", "sk-abc/def+ghi", "KEY\n", "A=B"):
        with pytest.raises(ValueError, match="NAME of an environment variable") as caught:
            check_env_var_name(bad)
        assert bad not in str(caught.value) or not bad
    assert shown_env_var_name("OPENAI_API_KEY") == "OPENAI_API_KEY"
    assert "aBcD" not in shown_env_var_name("aBcD123")


def test_submit_refuses_a_secret_given_as_an_env_name_without_echoing_it(tmp_path):
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    with pytest.raises(JobSpecError, match="NAME of an environment variable") as caught:
        plan_submission("job.yaml", "t", "2026-01-01", "http://h:8265", working_dir=None,
                        pip=[], env_names=[secret], output=None, force=False)
    assert secret not in str(caught.value)
    plan = SubmitPlan(address="a", job_file="j", ds="d", base_id="b", env_names=["notSet1x"])
    with pytest.raises(JobSpecError) as caught:
        plan.runtime_env({})
    assert "notSet1x" not in str(caught.value)
    assert json.dumps(SubmitPlan(address="a", job_file="j", ds="d", base_id="b",
                                 env_names=["K"]).runtime_env({"K": "v"})["env_vars"]) == \
        '{"K": "v"}'


def test_an_unfinished_attempt_is_resumed_in_both_output_modes(tmp_path):
    from augment_ray.io.committed import STARTED, SUCCESS
    from augment_ray.io.journal import WORK_DIR
    from augment_ray.pipeline import output_mode

    def job(mode: str, steps: list | None = None):
        return parse_job({"input": {"uri": str(tmp_path / "in")},
                          "output": {"uri": str(tmp_path / "out"), "mode": mode},
                          "steps": steps or [{"kind": "dedup_exact"}]})

    out = location(str(tmp_path / "out"), None)
    (tmp_path / "out").mkdir()
    assert output_mode(job("error-if-exists"), out) == ("error-if-exists", ())
    assert output_mode(job("overwrite"), out) == ("overwrite", ())
    (tmp_path / "out" / STARTED).write_text(json.dumps({"job_digest": spec_digest(job(
        "overwrite"))}))
    resumed = ("overwrite", (WORK_DIR,))
    assert output_mode(job("error-if-exists"), out) == resumed
    assert output_mode(job("overwrite"), out) == resumed
    assert output_mode(job("overwrite"), out, fresh=True) == ("overwrite", ())  # --force
    # another job's attempt is not resumed: refused, or replaced under overwrite
    other = job("error-if-exists", [{"kind": "dedup_near"}])
    assert output_mode(other, out) == ("error-if-exists", ())
    assert output_mode(job("overwrite", [{"kind": "dedup_near"}]), out) == ("overwrite", ())
    # a committed output of this job is no attempt to resume: overwrite replaces it
    (tmp_path / "out" / SUCCESS).write_text("{}")
    assert output_mode(job("overwrite"), out) == ("overwrite", ())
