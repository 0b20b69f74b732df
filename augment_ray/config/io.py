"""Where a job's rows come from and where they go."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from augment_ray.config.base import Spec, StorageOptions

# ColumnMap field -> conversation layout (augment_ray.conversations.Layout)
CONVERSATION_FIELDS = {"messages": "messages", "conversations": "sharegpt", "turns": "turns"}


class ColumnMap(Spec):
    """Maps the pipeline's canonical columns to the user's column names. Mapped columns are
    renamed to the canonical name on read; every other input column is kept as it is."""

    instruction: str = Field(
        "instruction", description="the prompt; required unless the input has a conversation "
        "column (messages, conversations or turns)"
    )
    input: str | None = Field(
        "input", description="optional context; used when the column exists"
    )
    output: str | None = Field(
        "output", description="optional response; used when the column exists"
    )
    id: str | None = Field(
        "id", description="a stable row id, used when the column exists; else content-derived"
    )
    messages: str | None = Field(
        "messages", description="a multi-turn conversation as a list of {role, content} "
        "(roles system, user, assistant; OpenAI style); used when the column exists"
    )
    conversations: str | None = Field(
        "conversations", description="a multi-turn conversation as a list of {from, value} "
        "(ShareGPT: from human, gpt or system); used when the column exists"
    )
    turns: str | None = Field(
        None, description="a list of strings, user questions asked one after another "
        "(MT-Bench layout); off unless named"
    )

    @model_validator(mode="after")
    def _distinct_conversation_columns(self) -> ColumnMap:
        named: dict[str, str] = {}
        for field in CONVERSATION_FIELDS:
            source = getattr(self, field)
            if source is not None and source in named:
                raise ValueError(f"input.columns.{named[source]} and input.columns.{field} "
                                 f"both name column {source!r}; a column has one layout")
            if source is not None:
                named[source] = field
        return self


class InputSpec(Spec):
    uri: str = Field(description="file, folder or prefix: /data/x, s3://bucket/p, oss://bucket/p")
    format: Literal["auto", "parquet", "jsonl", "hf"] = Field(
        "auto", description="auto: by extension, or hf for a folder holding state.json or "
        "dataset_dict.json; hf: a Hugging Face datasets folder (Dataset.save_to_disk or "
        "DatasetDict.save_to_disk)"
    )
    split: str | None = Field(
        None, description="the split of a DatasetDict folder to read; needed when it has more "
        "than one"
    )
    columns: ColumnMap = ColumnMap()
    storage: StorageOptions | None = None
    max_row_chars: int = Field(
        200_000, gt=0, description="rows whose text (a conversation: all its turns) is longer "
        "are rejected as too_long"
    )


class OutputSpec(Spec):
    uri: str
    mode: Literal["error-if-exists", "overwrite"] = "error-if-exists"
    storage: StorageOptions | None = None
    max_rows_per_file: int = Field(100_000, gt=0)
