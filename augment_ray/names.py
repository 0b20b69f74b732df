"""What the NAME of an environment variable may be, for every place that takes one (the job
spec's storage.*_env and api_key_env, `augment-ray submit --env`). Imports nothing heavy."""

from __future__ import annotations

import re

# letters, digits and _, not starting with a digit (\Z: no trailing newline, with match too)
ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
# the upper-case form names conventionally take; a name with lower-case letters may be a
# secret pasted where its variable's name belongs, so messages do not echo it
CONVENTIONAL_ENV_VAR_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*\Z")

NOT_AN_ENV_VAR_NAME = ("must be the NAME of an environment variable (letters, digits, _), "
                       "never the secret itself")


def check_env_var_name(value: str | None) -> str | None:
    """`value` itself when it is None or a variable name; else ValueError (the message does not
    repeat the value: it may be the secret). Fits a pydantic field validator as it is."""
    if value is not None and not ENV_VAR_NAME.match(value):
        raise ValueError(NOT_AN_ENV_VAR_NAME)
    return value


def shown_env_var_name(name: str) -> str:
    """`name` when it looks like a conventional variable name, else a placeholder."""
    return name if CONVENTIONAL_ENV_VAR_NAME.match(name) else "(a name with lower-case letters)"
