"""LLM tasks: `prompt(row) -> messages` and `parse(row, text) -> columns`, nothing else."""
