"""Multi-turn conversations: the canonical `messages` column and what steps read of it.

A conversation row carries its turns in `messages` (a list of {role, content} structs, roles
system / user / assistant): an optional system turn first, then user and assistant turns in
turn. It may end with a user turn (awaiting an answer), and a conversation of user turns only
(MT-Bench's `turns`, questions to answer one after another) is accepted as such.

Beside it the row keeps the canonical text columns, derived from the turns so that every step
that reads text works on a conversation unchanged: `instruction` is the first user turn,
`output` the last assistant turn (null when none), `input` is null. A step that rewrites one of
them leaves `messages` as it was; `apply_text_columns` puts them back into the turns (export
does, so a corrected answer or a refined first question is what gets trained on).
Single-turn rows have `messages` null.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MESSAGES = "messages"
MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
CONVERSATION_TYPE = pa.list_(MESSAGE_TYPE)
ROLES = ("system", "user", "assistant")
# ShareGPT's `from` tags (LLaMA-Factory's defaults and the original dump's) -> roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
SHAREGPT_TAGS = {"system": "system", "user": "human", "assistant": "gpt"}
# how a step's text columns read a conversation: the user side, the assistant side
SIDES = {"instruction": "user", "output": "assistant"}

Turn = dict[str, str]
Layout = Literal["messages", "sharegpt", "turns"]


class BadConversation(ValueError):
    """A conversation that cannot be used; the row is rejected with `reason` and `detail`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _turn_of(item: Any, number: int, layout: Layout) -> Turn:
    if layout == "turns":
        role, content = "user", item
    elif isinstance(item, dict):
        if layout == "sharegpt":
            tag, content = item.get("from"), item.get("value")
            role = SHAREGPT_ROLES.get(str(tag).lower()) if tag is not None else None
            if role is None:
                raise BadConversation("unknown_role", f"turn {number} is from {tag!r}; expected "
                                      "one of " + ", ".join(SHAREGPT_ROLES))
        else:
            role, content = item.get("role"), item.get("content")
            if role not in ROLES:
                raise BadConversation("unknown_role", f"turn {number} has role {role!r}; "
                                      "expected system, user or assistant")
    else:
        raise BadConversation("not_a_conversation",
                              f"turn {number} is {type(item).__name__}, not a "
                              f"{'{from, value}' if layout == 'sharegpt' else '{role, content}'}"
                              " object")
    if not isinstance(content, str) or not content.strip():
        raise BadConversation("empty_turn", f"turn {number} ({role}) has no text")
    return {"role": role, "content": content}


def conversation_from(value: Any, layout: Layout) -> list[Turn]:
    """The canonical turns of one input value (a `messages` list, a ShareGPT `conversations`
    list, or a list of user questions); raises BadConversation naming the turn at fault
    (turns are numbered from 1)."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        raise BadConversation("empty_conversation", "the conversation has no turns")
    if not isinstance(value, (list, tuple)):
        raise BadConversation("not_a_conversation",
                              f"expected a list of turns, got {type(value).__name__}")
    turns = [_turn_of(item, number, layout) for number, item in enumerate(value, start=1)]
    check_order(turns)
    return turns


def check_order(turns: Sequence[Turn]) -> None:
    """System only first; then user and assistant in turn, a user turn first; or user turns
    only (questions awaiting answers)."""
    body = list(turns[1:] if turns and turns[0]["role"] == "system" else turns)
    offset = len(turns) - len(body)
    if not body:
        raise BadConversation("empty_conversation", "the conversation has no user turn")
    if all(turn["role"] == "user" for turn in body):
        return
    for index, turn in enumerate(body):
        number = index + offset + 1
        if turn["role"] == "system":
            raise BadConversation("misplaced_system",
                                  f"turn {number} is a system turn; only the first turn may be")
        expected = "user" if index % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise BadConversation("not_alternating", f"turn {number} is {turn['role']} where "
                                  f"{expected} was expected (user and assistant must alternate, "
                                  "starting with user)")


def system_prompt(turns: Sequence[Turn]) -> str | None:
    return turns[0]["content"] if turns and turns[0]["role"] == "system" else None


def first_user(turns: Sequence[Turn]) -> str | None:
    return next((t["content"] for t in turns if t["role"] == "user"), None)


def last_assistant(turns: Sequence[Turn]) -> str | None:
    return next((t["content"] for t in reversed(turns) if t["role"] == "assistant"), None)


def exchanges(turns: Sequence[Turn]) -> list[tuple[str, str | None]]:
    """(user, assistant) pairs in order; the answer is None for an unanswered question."""
    pairs: list[tuple[str, str | None]] = []
    for turn in turns:
        if turn["role"] == "user":
            pairs.append((turn["content"], None))
        elif turn["role"] == "assistant" and pairs and pairs[-1][1] is None:
            pairs[-1] = (pairs[-1][0], turn["content"])
    return pairs


def row_conversation(row: dict[str, Any]) -> list[Turn] | None:
    """The row's turns, or None for a single-turn row."""
    turns = row.get(MESSAGES)
    return list(turns) if turns else None


def apply_text_columns(turns: Sequence[Turn], instruction: str | None,
                       output: str | None) -> list[Turn]:
    """`turns` with the first user turn set to `instruction` and the last assistant turn to
    `output` (where given): the conversation as the row's text columns now say it is."""
    turns = [dict(turn) for turn in turns]
    if instruction:
        first = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
        if first is not None:
            turns[first]["content"] = instruction
    if output:
        last = next((i for i in range(len(turns) - 1, -1, -1)
                     if turns[i]["role"] == "assistant"), None)
        if last is not None:
            turns[last]["content"] = output
    return turns


def history_text(turns: Sequence[Turn]) -> str:
    """The conversation as plain text for a prompt that is not itself a chat (a judge's
    question): one 'Role: text' paragraph per turn."""
    return "\n\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns)


def judged_turns(turns: Sequence[Turn]) -> tuple[list[Turn], str | None]:
    """What a judge sees of a conversation: the turns before its last assistant turn, and that
    turn (None when the conversation ends unanswered)."""
    last = next((i for i in range(len(turns) - 1, -1, -1)
                 if turns[i]["role"] == "assistant"), None)
    if last is None:
        return list(turns), None
    return list(turns[:last]), turns[last]["content"]


def conversation_array(conversations: Sequence[Sequence[Turn] | None]) -> pa.Array:
    return pa.array([None if c is None else list(c) for c in conversations], CONVERSATION_TYPE)


def side_text(messages: pa.ChunkedArray | pa.Array, role: str | None,
              separator: str = "\n") -> pa.Array:
    """One string per row (vectorized): the contents of the row's turns of `role` joined by
    `separator` (every turn as 'role: content' when role is None); null for rows without a
    conversation."""
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks() if messages.num_chunks else pa.array(
            [], CONVERSATION_TYPE)
    n = len(messages)
    valid = pc.is_valid(messages)
    flat = pc.list_flatten(messages)
    parents = pc.list_parent_indices(messages).to_numpy(zero_copy_only=False)
    roles = pc.struct_field(flat, "role")
    contents = pc.fill_null(pc.struct_field(flat, "content"), "")
    if role is None:
        keep = np.ones(len(flat), dtype=bool)
        contents = pc.binary_join_element_wise(roles, contents, ": ")
    else:
        keep = pc.fill_null(pc.equal(roles, role), False).to_numpy(zero_copy_only=False)
    kept = pc.filter(contents, pa.array(keep))
    counts = np.bincount(parents[keep], minlength=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), kept), separator)
    return pc.if_else(valid, joined, pa.nulls(n, pa.string()))
