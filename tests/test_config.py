"""Job spec validation: bad jobs give one paragraph naming the field; good ones load."""

from __future__ import annotations

from pathlib import Path

import pytest

from augment_ray.config.job import load_job, parse_job
from augment_ray.errors import JobSpecError
from augment_ray.kinds import step_kinds

ROOT = Path(__file__).resolve().parents[1]


def minimal(**overrides):
    job = {
        "input": {"uri": "in/"},
        "output": {"uri": "out/"},
        "engines": {"small": {"kind": "transformers"}},
        "steps": [{"kind": "refine", "engine": "small"}],
    }
    job.update(overrides)
    return job


def error_of(data) -> str:
    with pytest.raises(JobSpecError) as info:
        parse_job(data, source="job.yaml")
    assert info.value.exit_code == 2
    return str(info.value)


def test_example_job_is_valid():
    job = load_job(ROOT / "jobs" / "refine_seed_tasks.yaml")
    assert job.steps[0].kind == "refine"
    assert job.engines["small"].model == "bundled"
    assert job.output.mode == "overwrite"


def test_defaults():
    job = parse_job(minimal())
    assert job.output.mode == "error-if-exists"
    assert job.input.columns.instruction == "instruction"
    assert job.engines["small"].sampling.temperature == 0.0


def test_missing_input_names_the_field():
    data = minimal()
    del data["input"]
    assert error_of(data) == "job.yaml is not a valid job: input: Field required."


def test_unknown_field_is_rejected_with_hint():
    message = error_of(minimal(output={"uri": "o", "secret_access_key": "abc"}))
    assert "output.secret_access_key: unknown field" in message
    assert "env vars" in message


def test_unknown_step_engine_lists_known_engines():
    message = error_of(minimal(steps=[{"kind": "refine", "engine": "big"}]))
    assert "steps[0].engine: 'big' is not an engine defined in `engines` (small)" in message


def test_unknown_step_kind():
    message = error_of(minimal(steps=[{"kind": "refin", "engine": "small"}]))
    expected = ", ".join(sorted(step_kinds()))  # the registry's kinds, not a list kept here
    assert {"refine", "dedup_near", "dedup_semantic", "score"} <= set(step_kinds())
    assert f"steps[0]: unknown step kind; expected one of: {expected}." in message


def test_step_without_kind():
    assert "steps[0]: each step needs a `kind`" in error_of(minimal(steps=[{"engine": "small"}]))


def test_bad_mode_and_negative_numbers():
    message = error_of(minimal(output={"uri": "o", "mode": "append"}))
    assert "output.mode: Input should be 'error-if-exists' or 'overwrite'" in message
    message = error_of(minimal(engines={"small": {"batch_size": 0}}))
    assert "engines.small.batch_size: Input should be greater than 0" in message


def test_duplicate_step_names():
    steps = [{"kind": "refine", "engine": "small"}, {"kind": "refine", "engine": "small"}]
    assert "step name 'refine' is used twice" in error_of(minimal(steps=steps))


def test_secret_in_env_name_field_is_refused():
    storage = {"access_key_id_env": "AKIA/xyz+secret", "secret_access_key_env": "S"}
    message = error_of(minimal(input={"uri": "s3://b/p", "storage": storage}))
    assert "input.storage.access_key_id_env" in message
    assert "NAME of an environment variable" in message


def test_top_level_not_a_mapping():
    assert "expected a mapping" in error_of(["a", "b"])


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("input:\n  uri: [unclosed\noutput: {}\n")
    with pytest.raises(JobSpecError) as info:
        load_job(path)
    assert str(info.value).startswith(f"{path} is not valid YAML at line")


def test_missing_job_file(tmp_path):
    with pytest.raises(JobSpecError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")


def test_sampling_override_merges():
    job = parse_job(minimal(steps=[{"kind": "refine", "engine": "small",
                                    "sampling": {"max_tokens": 7}}]))
    merged = job.engines["small"].sampling.merged(job.steps[0].sampling)
    assert merged.max_tokens == 7
    assert merged.temperature == 0.0


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_job_is_valid_and_builds(path):
    from augment_ray.kinds import build_steps

    job = load_job(path)
    assert [step.name for step in build_steps(job)] == [s.step_name for s in job.steps]


def test_clear_steps_name_their_bad_fields():
    assert "steps[1].judge: 'big' is not an engine" in error_of(minimal(steps=[
        {"kind": "score", "engine": "small"},
        {"kind": "auto_correct", "engine": "small", "judge": "big"},
    ]))
    assert "steps[0].methods: a method is listed twice" in error_of(
        minimal(steps=[{"kind": "score", "engine": "small", "methods": ["p_yes", "p_yes"]}]))
    assert "steps[0].methods[0]: Input should be" in error_of(
        minimal(steps=[{"kind": "score", "engine": "small", "methods": ["vibes"]}]))
    assert "steps[0].quantile: Input should be less than 1" in error_of(
        minimal(steps=[{"kind": "auto_filter", "quantile": 1.0}]))
    assert "steps[0].eta: Input should be less than or equal to 1" in error_of(
        minimal(steps=[{"kind": "auto_correct", "engine": "small", "eta": 1.5}]))


def test_clear_step_defaults():
    job = parse_job(minimal(steps=[{"kind": "score", "engine": "small"},
                                   {"kind": "auto_filter"},
                                   {"kind": "auto_correct", "engine": "small"}]))
    score, auto_filter, auto_correct = job.steps
    assert score.methods == ["p_yes"] and score.beta == 0.7
    assert auto_filter.threshold is None and auto_filter.quantile == 0.5
    assert auto_filter.confidence_column == "score_confidence"
    assert auto_correct.eta == 0.8 and auto_correct.judge is None and auto_correct.both_orders
