"""Every LLM step on conversation rows (`messages`): refine and expand read the first user turn,
pair_expand the first exchange, respond answers every user turn in rounds with its own earlier
answers, the judges (score, auto_correct, the LLM2LLM student, grader and teacher) see the turns
before the last answer. Prompt building and the runner's rounds with scripted engines; respond
multi-turn with the real bundled model on a real local Ray, rerun from its journal."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scripted_runner import runner as scripted_runner

from augment_ray import pipeline
from augment_ray.config.base import SamplingParams
from augment_ray.config.job import parse_job
from augment_ray.conversations import (
    CONVERSATION_TYPE,
    check_order,
    conversation_array,
    first_user,
    last_assistant,
)
from augment_ray.engines.base import Completion, GenerationFailure, Messages
from augment_ray.engines.transformers_engine import TransformersEngineSpec
from augment_ray.io.journal import COMPLETIONS, GenerationJournal, JournalIndex
from augment_ray.io.journal_compact import list_journal
from augment_ray.io.journal_index import build_index, read_keys
from augment_ray.kinds import build_steps
from augment_ray.loops.llm2llm import TRAIN_SCHEMA, as_train
from augment_ray.steps import engine_pool, llm, ray_data_llm
from augment_ray.steps.auto_correct import (
    CANDIDATE_PHASE,
    COMPARE_PHASE,
    AutoCorrectStepSpec,
    CorrectRunner,
)
from augment_ray.steps.auto_filter import Threshold
from augment_ray.steps.engine_pool import GuardedEngine
from augment_ray.steps.score import ScoreRunner, ScoreStepSpec
from augment_ray.storage import location
from augment_ray.tasks import judge
from augment_ray.tasks.expand import ExpandTask
from augment_ray.tasks.llm2llm import JudgeGradeTask, PredictTask, TeacherTask
from augment_ray.tasks.pair_expand import PairExpandTask
from augment_ray.tasks.refine import RefineTask
from augment_ray.tasks.respond import RespondTask
from augment_ray.validate.checks import ResponseChecks


def say(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SYSTEM = say("system", "Answer briefly.")
# system, two answered exchanges
TWO_EXCHANGES = [SYSTEM, say("user", "Q1"), say("assistant", "old1"), say("user", "Q2"),
                 say("assistant", "old2")]
QUESTIONS = [say("user", "T1"), say("user", "T2"), say("user", "T3")]  # MT-Bench style
UNANSWERED = [say("user", "P1"), say("assistant", "oldp"), say("user", "P2")]


def table_of(conversations: list[list[dict] | None], **extra: list) -> pa.Table:
    """Rows as the reader leaves them: a conversation's text columns derived from its turns; a
    single-turn row (None) has its own instruction and output and a null `messages`."""
    n = len(conversations)
    return pa.table({
        "id": [f"c{i}" for i in range(n)],
        "instruction": [first_user(c) if c else f"single {i}" for i, c in
                        enumerate(conversations)],
        "input": pa.nulls(n, pa.string()),
        "output": [last_assistant(c) if c else "old single" for c in conversations],
        "messages": conversation_array(conversations),
        **extra,
        "source_id": [f"c{i}" for i in range(n)],
        "origin_step": ["input"] * n,
        "reject_step": pa.nulls(n, pa.string()),
        "reject_reason": pa.nulls(n, pa.string()),
        "reject_detail": pa.nulls(n, pa.string()),
    })


class ChatEngine:
    """Answers each prompt with `answer(messages)` (text, or a Completion / failure as is);
    records every call's prompts."""

    model_name = "scripted"

    def __init__(self, answer=None) -> None:
        self.answer = answer or (lambda messages: f"ans({messages[-1]['content']})")
        self.calls: list[list[Messages]] = []

    def generate(self, prompts, sampling):
        self.calls.append([list(p) for p in prompts])
        results = []
        for messages in prompts:
            answer = self.answer(messages)
            results.append(answer if isinstance(answer, Completion | GenerationFailure)
                           else Completion(answer, 10 * len(messages), 3, "stop"))
        return results

    @property
    def prompts(self) -> list[Messages]:
        return [p for call in self.calls for p in call]


def runner(task, engine, **options):
    return scripted_runner(task, engine, "r", **options)


def respond_task(checks: ResponseChecks | None = None,
                 instruction_column: str = "instruction") -> RespondTask:
    return RespondTask(instruction_column, "r_previous_output", checks, "r_previous_messages")


def alternates(conversation: list[dict]) -> bool:
    check_order(conversation)  # raises unless system first, then user/assistant in turn
    body = [t for t in conversation if t["role"] != "system"]
    return [t["role"] for t in body] == ["user", "assistant"] * (len(body) // 2)


# ------------------------------------------------------------------ respond, in rounds


def test_respond_answers_every_user_turn_in_rounds_with_its_own_earlier_answers():
    engine = ChatEngine()
    table = table_of([TWO_EXCHANGES, QUESTIONS, UNANSWERED, None])
    out = runner(respond_task(), engine)(table)
    rows = out.to_pylist()

    # one engine call per round: every row's first turn, then the rows with a second, a third
    assert [len(call) for call in engine.calls] == [4, 3, 1]
    assert engine.calls[0][0] == [SYSTEM, say("user", "Q1")]
    assert engine.calls[1][0] == [SYSTEM, say("user", "Q1"), say("assistant", "ans(Q1)"),
                                  say("user", "Q2")]
    assert engine.calls[2][0] == [say("user", "T1"), say("assistant", "ans(T1)"),
                                  say("user", "T2"), say("assistant", "ans(T2)"),
                                  say("user", "T3")]
    shown = json.dumps(engine.prompts)
    assert "old1" not in shown and "oldp" not in shown  # never the row's old answers

    two, questions, unanswered, single = rows
    assert two["messages"] == [SYSTEM, say("user", "Q1"), say("assistant", "ans(Q1)"),
                               say("user", "Q2"), say("assistant", "ans(Q2)")]
    assert two["r_previous_messages"] == TWO_EXCHANGES
    assert (two["output"], two["r_previous_output"]) == ("ans(Q2)", "old2")
    assert questions["messages"] == [say("user", "T1"), say("assistant", "ans(T1)"),
                                     say("user", "T2"), say("assistant", "ans(T2)"),
                                     say("user", "T3"), say("assistant", "ans(T3)")]
    assert questions["r_previous_output"] is None
    assert unanswered["messages"][-2:] == [say("user", "P2"), say("assistant", "ans(P2)")]
    for row, turns in ((two, 2), (questions, 3), (unanswered, 2)):
        assert alternates(row["messages"])
        assert sum(t["role"] == "assistant" for t in row["messages"]) == turns
        assert row["r_completion_tokens"] == 3 * turns  # summed over the turns
        assert row["r_prompt_tokens"] == sum(10 * len(p) for p in engine.prompts
                                             if p[0] == row["messages"][0])
        assert (row["r_attempts"], row["r_finish_reason"]) == (1, "stop")
        assert row["reject_reason"] is None
    # a single-turn row beside them is answered as ever; its messages stay null
    assert (single["output"], single["r_previous_output"]) == ("ans(single 3)", "old single")
    assert single["messages"] is None and single["r_previous_messages"] is None
    assert out.schema.field("messages").type == CONVERSATION_TYPE
    assert out.schema.field("r_previous_messages").type == CONVERSATION_TYPE


def test_respond_takes_the_first_user_turn_from_instruction_column():
    engine = ChatEngine()
    table = table_of([UNANSWERED], refined_instruction=["P1, refined"])
    row = runner(respond_task(instruction_column="refined_instruction"), engine)(
        table).to_pylist()[0]
    assert engine.calls[0] == [[say("user", "P1, refined")]]
    assert row["messages"] == [say("user", "P1, refined"), say("assistant", "ans(P1, refined)"),
                               say("user", "P2"), say("assistant", "ans(P2)")]
    assert row["r_previous_messages"] == UNANSWERED


def test_a_single_turn_table_gets_no_conversation_columns():
    table = table_of([None, None]).drop_columns(["messages"])
    out = runner(respond_task(), ChatEngine())(table)
    assert "messages" not in out.column_names and "r_previous_messages" not in out.column_names
    assert out["output"].to_pylist() == ["ans(single 0)", "ans(single 1)"]


def test_a_failed_turn_rejects_the_conversation_naming_the_turn():
    def answer(messages):
        question = messages[-1]["content"]
        if question == "Q2":
            return "   "  # unparsable every time
        if question == "T2":
            return GenerationFailure("prompt_too_long", "5000 > 2048")
        return f"ans({question})"

    engine = ChatEngine(answer)
    out = runner(respond_task(), engine, max_retries=1)(
        table_of([TWO_EXCHANGES, QUESTIONS, UNANSWERED])).to_pylist()
    two, questions, unanswered = out
    assert (two["reject_step"], two["reject_reason"]) == ("r", "empty_output")
    assert two["reject_detail"].startswith("user turn 2: ")
    assert two["r_attempts"] == 2  # the most any turn took
    assert two["output"] == "old2" and two["messages"] == TWO_EXCHANGES  # left as they were
    assert (questions["reject_reason"], questions["reject_detail"]) == \
        ("prompt_too_long", "user turn 2: 5000 > 2048")
    assert [t["content"] for p in engine.prompts for t in p if t["role"] == "user"].count(
        "T3") == 0  # a failed turn ends the conversation's rounds
    assert unanswered["reject_reason"] is None


def test_each_turns_answer_is_checked_against_that_turns_question():
    # an answer repeating its own question echoes it; the same words answering another
    # question do not
    def answer(messages):
        question = messages[-1]["content"]
        return {"Name three red fruits please": "Name three blue birds now please",
                "Name three blue birds now please": "Name three blue birds now please"}.get(
            question, f"ans({question})")

    conversation = [say("user", "Name three red fruits please"), say("assistant", "old"),
                    say("user", "Name three blue birds now please"), say("assistant", "old")]
    checks = ResponseChecks(min_similarity=None, max_similarity=None)
    row = runner(respond_task(checks), ChatEngine(answer))(table_of([conversation])).to_pylist()[0]
    assert row["reject_reason"] == "echoes_instruction"
    assert row["reject_detail"].startswith("user turn 2: ")


def test_a_rerun_replays_every_round_from_the_journal(tmp_path):
    folder = location(str(tmp_path / "_work" / "respond"), None)
    table = table_of([TWO_EXCHANGES, QUESTIONS, UNANSWERED, None])
    first_engine = ChatEngine()
    first = runner(respond_task(), GuardedEngine(first_engine, GenerationJournal(folder, "run1")))(
        table)
    assert len(first_engine.prompts) == 8  # 2 + 3 + 2 + 1 turns

    # a later attempt replays what the first journaled (as a restarted actor's journal does)
    files = list_journal(folder, "run2")
    index = build_index(read_keys(folder.fs, files.compacted + files.earlier + files.current))
    journal = GenerationJournal(folder, "run2", reopened=JournalIndex(index, COMPLETIONS,
                                                                      folder.fs))
    second_engine = ChatEngine(lambda messages: pytest.fail(f"asked again: {messages}"))
    second = runner(respond_task(), GuardedEngine(second_engine, journal))(table)
    assert second_engine.calls == []
    assert second.equals(first)


# ------------------------------------------------------------------ the other generating steps


def test_refine_rewrites_the_first_user_turn_and_leaves_the_turns_alone():
    engine = ChatEngine(lambda messages: "<refined>Q1, more precisely</refined>")
    table = table_of([TWO_EXCHANGES])
    out = runner(RefineTask(native=False, output_column="refined_instruction"), engine)(table)
    prompt = engine.prompts[0][-1]["content"]
    assert "Q1" in prompt and "Q2" not in prompt and "old1" not in prompt
    row = out.to_pylist()[0]
    assert row["refined_instruction"] == "Q1, more precisely"
    assert row["messages"] == TWO_EXCHANGES
    assert out.schema.field("messages").type == CONVERSATION_TYPE
    native = RefineTask(native=True, output_column="x")
    assert native.prompts(table.to_pylist()[0]) == [[say("user", "Q1")]]


def test_expand_starts_from_the_first_user_turn_and_its_new_rows_are_single_turn():
    engine = ChatEngine(lambda messages: "<instruction>Q9</instruction>")
    out = runner(ExpandTask(native=False, n=1), engine)(table_of([TWO_EXCHANGES])).to_pylist()
    prompt = engine.prompts[0][-1]["content"]
    assert "Q1" in prompt and "Q2" not in prompt
    created = [r for r in out if r["origin_step"] == "r"]
    assert created[0]["instruction"] == "Q9" and created[0]["messages"] is None


def test_pair_expand_shows_a_conversations_first_exchange():
    task = PairExpandTask(native=True, k=2, n=1, seed=0)
    rows = table_of([TWO_EXCHANGES, UNANSWERED, QUESTIONS]).to_pylist()
    task.with_batch(rows)
    assert [r["id"] for r in task._pool] == ["c0", "c1"]  # user turns only: no pair to show
    prompt = task.prompts(rows[0])[0][0]["content"]
    assert "### Instruction\n\nQ1\n\n### Response\n\nold1" in prompt
    assert "### Instruction\n\nP1\n\n### Response\n\noldp" in prompt
    assert "old2" not in prompt and "Q2" not in prompt
    assert task.prompts(rows[2]) == []


# ------------------------------------------------------------------ judges


def test_the_judged_question_is_the_conversation_before_its_last_answer():
    two, questions, unanswered, single = table_of(
        [TWO_EXCHANGES, QUESTIONS, UNANSWERED, None]).to_pylist()
    assert judge.judged_text(two) == \
        "System: Answer briefly.\n\nUser: Q1\n\nAssistant: old1\n\nUser: Q2"
    assert judge.answer_messages(two) == TWO_EXCHANGES[:4]
    # one question and nothing before it: just the question, as a single-turn row's
    assert judge.judged_text(unanswered) == "P1"
    assert judge.answer_messages(unanswered) == judge.answer_prompt("P1")
    assert judge.judged_text({**single, "input": "ctx"}) == "single 3\n\nctx"
    # the first user turn as instruction_column has it
    assert judge.judged_text({**two, "better": "Q1!"}, "better").startswith(
        "System: Answer briefly.\n\nUser: Q1!\n\n")
    assert judge.asked_turns(questions) == QUESTIONS


class RuleEngine:
    """Answers each prompt with the first rule whose key is in its last message."""

    model_name = "scripted"

    def __init__(self, rules: list[tuple[str, Completion]]) -> None:
        self.rules = rules
        self.prompts: list[Messages] = []

    def generate(self, prompts, sampling):
        self.prompts += prompts
        return [next(a for key, a in self.rules if key in p[-1]["content"]) for p in prompts]


def done(text: str, logprobs=None) -> Completion:
    return Completion(text, 20, 2, "stop", logprobs)


def test_score_judges_the_last_answer_given_the_turns_before_it(monkeypatch):
    engine = RuleEngine([("Reply with Yes or No", done("Yes", ({"Yes": -0.1, "No": -2.5},))),
                         ("Q2", done("ans2"))])
    monkeypatch.setattr(engine_pool, "build_engine", lambda spec: engine)
    score = ScoreRunner(engine_spec=TransformersEngineSpec(), step="score",
                        spec=ScoreStepSpec(kind="score", engine="e",
                                           methods=["p_yes", "consistency"],
                                           consistency_samples=1),
                        sampling=SamplingParams(max_tokens=8))
    out = score(table_of([TWO_EXCHANGES, QUESTIONS])).to_pylist()
    judged = next(p for p in engine.prompts if "Reply with Yes or No" in p[-1]["content"])
    text = judged[-1]["content"]
    assert "User: Q1\n\nAssistant: old1\n\nUser: Q2" in text and "old2" in text
    sample = next(p for p in engine.prompts if p[-1]["content"] == "Q2")
    assert sample == TWO_EXCHANGES[:4]  # the judge answers it as a chat, for consistency
    assert out[0]["reject_reason"] is None and out[0]["score_p_yes"] > 0.5
    assert out[1]["reject_reason"] == "missing_response"
    assert "no assistant turn" in out[1]["reject_detail"]


def test_score_each_turn_judges_every_answer_and_keeps_the_lowest(monkeypatch):
    # the judge likes the second answer and doubts the first
    engine = RuleEngine([("Proposed answer:\nold1", done("No", ({"Yes": -2.0, "No": -0.2},))),
                         ("Proposed answer:\nold2", done("Yes", ({"Yes": -0.1, "No": -2.5},))),
                         ("Proposed answer:\nold single", done("Yes", ({"Yes": -0.1, "No": -3},)))])
    monkeypatch.setattr(engine_pool, "build_engine", lambda spec: engine)

    def scored(turns: str) -> list[dict]:
        engine.prompts.clear()
        runner = ScoreRunner(engine_spec=TransformersEngineSpec(), step="score",
                             spec=ScoreStepSpec(kind="score", engine="e", turns=turns),
                             sampling=SamplingParams(max_tokens=8))
        return runner(table_of([TWO_EXCHANGES, None])).to_pylist()

    last, single = scored("last")
    assert "score_turn_confidences" not in last and last["score_confidence"] > 0.5
    each, single_each = scored("each")
    first_judged = next(p[-1]["content"] for p in engine.prompts if "old1" in p[-1]["content"])
    # the turns before answer 1 only
    assert "System: Answer briefly.\n\nUser: Q1\n\nProposed" in first_judged
    assert "Q2" not in first_judged
    second_judged = next(p[-1]["content"] for p in engine.prompts if "old2" in p[-1]["content"])
    assert "User: Q1\n\nAssistant: old1\n\nUser: Q2" in second_judged
    low, high = each["score_turn_confidences"]
    assert low < 0.5 < high and each["score_confidence"] == low == each["score_p_yes"]
    assert each["score_prompt_tokens"] == 40  # two judged answers, 20 each
    # a single-turn row is one answer either way
    assert single_each["score_turn_confidences"] == [single_each["score_confidence"]]
    assert single_each["score_confidence"] == single["score_confidence"]


def test_auto_correct_rewrites_the_last_answer_given_the_turns_before_it(monkeypatch):
    engine = RuleEngine([("Response A:", done("Yes", ({"Yes": -0.05, "No": -3.0},))),
                         ("Q2", done("new2"))])
    monkeypatch.setattr(engine_pool, "build_engine", lambda spec: engine)
    correct = CorrectRunner(
        engine_spec=TransformersEngineSpec(), step="fix",
        spec=AutoCorrectStepSpec(kind="auto_correct", engine="e", both_orders=False, eta=0.5),
        threshold=Threshold(0.5, "absolute"), sampling=SamplingParams(max_tokens=8),
        phases=(CANDIDATE_PHASE, COMPARE_PHASE))
    row = correct(table_of([TWO_EXCHANGES], score_confidence=[0.1])).to_pylist()[0]
    assert engine.prompts[0] == TWO_EXCHANGES[:4]
    assert "User: Q1\n\nAssistant: old1\n\nUser: Q2" in engine.prompts[1][-1]["content"]
    assert (row["output"], row["fix_original_output"]) == ("new2", "old2")
    assert row["messages"] == TWO_EXCHANGES  # export puts `output` back into the last turn


def test_llm2llm_asks_a_conversation_seed_its_last_turn_and_keeps_its_turns():
    seed, single = table_of([TWO_EXCHANGES, None]).to_pylist()
    assert PredictTask().prompts(seed) == [TWO_EXCHANGES[:4]]
    assert PredictTask().prompts(single) == [judge.answer_prompt("single 1")]
    grade = JudgeGradeTask().prompts({**seed, "student_prediction": "p"})[0][0]["content"]
    assert "Assistant: old1\n\nUser: Q2" in grade and "old2" in grade
    teacher = TeacherTask("generic", 1)
    assert "Assistant: old1\n\nUser: Q2" in teacher.prompts(seed)[0][0]["content"]
    with pytest.raises(Exception, match="copy_of_seed"):
        teacher.parse(seed, "<question>Q2</question><answer>a</answer>")
    table = table_of([TWO_EXCHANGES, None])
    assert as_train(table)["messages"].to_pylist() == [TWO_EXCHANGES, None]
    assert as_train(table.drop_columns(["messages"])).schema == TRAIN_SCHEMA


# ------------------------------------------------------------------ ray.data.llm


def conversation_input(folder: Path, conversations: list[list[dict]]) -> None:
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"id": [f"c{i}" for i in range(len(conversations))],
                             "messages": conversation_array(conversations)}),
                   folder / "part-0.parquet")


def respond_job(input_uri: Path, output_uri: Path, engine: dict, **respond) -> dict:
    return {"name": "conversations", "input": {"uri": str(input_uri)},
            "output": {"uri": str(output_uri)}, "engines": {"m": engine},
            "steps": [{"kind": "respond", "engine": "m", "checks": False,
                       "reject_truncated": False, **respond}]}


def test_respond_on_conversations_leaves_ray_data_llm_for_an_engine_pool(tmp_path, monkeypatch):
    monkeypatch.setattr(llm, "prepare_engine", lambda spec: None)  # no vLLM needed to decide
    conversation_input(tmp_path / "turns", [TWO_EXCHANGES])
    (tmp_path / "single").mkdir()
    pq.write_table(pa.table({"instruction": ["Say hi."]}), tmp_path / "single" / "a.parquet")
    vllm = {"kind": "vllm", "model": "bundled", "execution": "ray_data_llm"}
    for folder, rounds in (("turns", True), ("single", False)):
        step = build_steps(parse_job(respond_job(tmp_path / folder, tmp_path / "out", vllm)))[0]
        assert step.runs_on_ray_data_llm
        step.prepare()
        assert step.in_rounds is rounds
        assert step.runs_on_ray_data_llm is not rounds
        assert step.describe()["execution"] == ("engine_pool" if rounds else "ray_data_llm")


def test_a_conversation_that_reaches_ray_data_llm_is_rejected_not_half_answered(monkeypatch):
    monkeypatch.setattr(ray_data_llm, "chat_template_of", lambda spec: json.dumps)
    job = parse_job(respond_job(Path("in"), Path("out"), {
        "kind": "vllm", "model": "bundled", "execution": "ray_data_llm"}))
    step = build_steps(job)[0]
    requests = ray_data_llm.request_rows(table_of([TWO_EXCHANGES, UNANSWERED[:1], None]), step)
    n = requests.num_rows  # what the processor adds to each request row
    answered = requests.append_column("generated_text", pa.array(["an answer"] * n)) \
        .append_column("num_input_tokens", pa.array([5] * n)) \
        .append_column("num_generated_tokens", pa.array([2] * n))
    two, one, single = ray_data_llm.output_rows(answered, step, "m").to_pylist()
    assert two["reject_reason"] == "needs_rounds" and two["messages"] == TWO_EXCHANGES
    assert one["reject_reason"] is None
    assert one["messages"] == [say("user", "P1"), say("assistant", "an answer")]
    assert (single["output"], single["messages"]) == ("an answer", None)


# ------------------------------------------------------------------ the real model


def die_before_commit(*args, **kwargs):
    raise RuntimeError("the attempt dies just before its commit")


@pytest.mark.integration
def test_respond_multi_turn_with_the_bundled_model_and_its_rerun_replays(
        local_ray, tmp_path, monkeypatch):
    conversations = [TWO_EXCHANGES, QUESTIONS, UNANSWERED,
                     [say("user", "Name a fruit."), say("assistant", "A pear.")]]
    conversation_input(tmp_path / "in", conversations)
    engine = {"kind": "transformers", "model": "bundled", "replicas": 1, "num_cpus": 1,
              "threads": 1, "batch_size": 8, "sampling": {"max_tokens": 8}}
    job = parse_job(respond_job(tmp_path / "in", tmp_path / "out", engine))
    turns = sum(sum(t["role"] == "user" for t in c) for c in conversations)

    with monkeypatch.context() as patched:  # the first attempt journals, then dies
        patched.setattr(pipeline, "commit", die_before_commit)
        with pytest.raises(RuntimeError, match="dies just before"):
            pipeline.run_job(job)
    summary = pipeline.run_job(job)

    assert summary["journal"]["respond"] == {"replayed": turns, "generated": 0}
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "data").to_pylist()}
    assert sorted(rows) == ["c0", "c1", "c2", "c3"]
    for key, old in zip(sorted(rows), conversations, strict=True):
        row = rows[key]
        new = row["messages"]
        assert alternates(new)
        asked = [t["content"] for t in new if t["role"] == "user"]
        assert asked == [t["content"] for t in old if t["role"] == "user"]
        assert sum(t["role"] == "assistant" for t in new) == len(asked)  # one answer each
        assert new[0] == old[0]  # the system turn, if any, kept
        assert row["respond_previous_messages"] == old
        assert row["output"] == new[-1]["content"] and row["output"].strip()
        assert row["respond_previous_output"] == last_assistant(old)
        assert row["respond_model"] == "SmolLM2-135M-Instruct"
        assert row["respond_completion_tokens"] >= len(asked)
    schema = pq.read_schema(next((tmp_path / "out" / "data").glob("*.parquet")))
    assert schema.field("messages").type == CONVERSATION_TYPE
    assert schema.field("respond_previous_messages").type == CONVERSATION_TYPE


def test_a_follow_up_answer_is_on_topic_with_the_questions_before_it():
    # MT-Bench's second turns ("rewrite your previous response") say little on their own: with
    # the real embedder, the rewrite below is off topic against the follow-up alone, on topic
    # against the conversation's questions so far
    from augment_ray.engines.embedding_engine import EmbeddingEngineSpec
    from augment_ray.validate.embedder import process_embedder

    first = ("Compose an engaging travel blog post about a recent trip to Hawaii, highlighting "
             "cultural experiences and must-see attractions.")
    follow_up = "Rewrite your previous response. Start every sentence with the letter A."
    rewrite = ("Aloha from Hawaii! A week on Oahu and Maui showed me hula, luaus and the "
               "volcanoes. Ancient temples and Waikiki beach are attractions every visitor must "
               "see.")
    conversation = [say("user", first), say("assistant", "Aloha! My trip to Hawaii..."),
                    say("user", follow_up), say("assistant", rewrite)]
    task = respond_task(ResponseChecks())
    candidate = task.candidate({}, {"output": rewrite, "messages": conversation})
    assert (candidate.source, candidate.topic) == (follow_up, f"{first}\n{follow_up}")
    embed = process_embedder(EmbeddingEngineSpec())
    alone = ResponseChecks().check([replace(candidate, topic=None)], embed)
    assert alone[0] is not None and alone[0][0] == "off_topic"
    assert task.check([({}, {"output": rewrite, "messages": conversation}, None, False)],
                      embed) == [None]
