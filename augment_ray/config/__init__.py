"""The job spec: pydantic models loaded from YAML, with errors that name the bad field.

base.py: the strict base model, storage, sampling and the engine spec base; io.py: input and
output; steps.py: the step spec bases; job.py: the whole job (its step and engine unions are
built from the kinds registered in augment_ray.kinds); dates.py: YAML and run dates.
"""
