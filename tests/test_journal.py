"""The journal's replay at scale: compaction of earlier attempts' one-call files (every answer kept
exactly once, crash-safe), the hash index and its row-group lookups, both kinds of result, on a
local disk and on a real local S3 server, and from inside a Ray actor as engine actors use it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from augment_ray.config.base import StorageOptions
from augment_ray.engines.base import Completion
from augment_ray.io import journal_compact
from augment_ray.io.journal import (
    COMPACTED,
    EmbeddingJournal,
    GenerationJournal,
    embedding_key,
    journaled_counts,
    key_hash,
    key_hashes,
    read_journal,
    request_key,
)
from augment_ray.io.journal_index import CACHED_GROUPS
from augment_ray.storage import location


def answer(n: int) -> Completion:
    return Completion(f"answer {n} " + "x" * (n % 7), n, n % 5 + 1, "stop")


def key(n: int) -> str:
    return request_key(f"prompt {n}", "{}", "0")


def journal_calls(work, pool: str, run_id: str, calls: list[range]) -> None:
    """What an attempt leaves: one small file per engine call."""
    journal = GenerationJournal(work.join(pool), run_id)
    for call in calls:
        journal.record([key(n) for n in call], [answer(n) for n in call])


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def small_groups(monkeypatch):
    """Row groups of 8 answers, so a few dozen answers span many groups and files."""
    monkeypatch.setattr(journal_compact, "ROW_GROUP_ROWS", 8)


def test_key_hashes_agree_with_key_hash_for_request_keys_and_others():
    keys = [key(n) for n in range(50)] + ["short", "F" * 32, "g" * 32, ""]
    assert [int(h) for h in key_hashes(keys)] == [key_hash(k) for k in keys]
    assert key_hash(key(3)) == int(key(3)[:16], 16)
    assert [int(h) for h in key_hashes(pa.array(keys).slice(10, 5))] == \
        [key_hash(k) for k in keys[10:15]]


def test_compaction_keeps_every_answer_exactly_once_and_replays_it_in_an_actor(
        local_ray, tmp_path, small_groups):
    work = location(str(tmp_path / "_work"), None)
    # 40 calls of 1-5 answers, answer 7 journaled twice (two calls asked it)
    calls = [range(n * 5, n * 5 + 1 + n % 5) for n in range(40)] + [range(7, 8)]
    journal_calls(work, "refine", "run1", calls)
    answered = sorted({n for call in calls for n in call})
    folder = tmp_path / "_work" / "refine"
    assert len(files(folder)) == 41

    journal = GenerationJournal.open(work, "refine", "run2")
    assert journal.earlier_count == len(answered)
    names = files(folder)
    assert len(names) == 1 and names[0].startswith(COMPACTED)
    stored = read_journal(work.join("refine"))
    assert sorted(stored["key"].to_pylist()) == sorted(key(n) for n in answered)
    assert pq.ParquetFile(folder / names[0]).num_row_groups == -(-len(answered) // 8)
    assert journaled_counts(work, "run2") == {"refine": {"replayed": len(answered),
                                                         "generated": 0}}

    @ray.remote
    def replay(journal: GenerationJournal, wanted: list[str]) -> tuple[list, int]:
        found = journal.answers().get_many(wanted)
        return found, len(journal.answers().cache)

    wanted = [key(n) for n in range(0, 210)]
    found, cached = ray.get(replay.remote(journal, wanted))
    assert found == [answer(n) if n in answered else None for n in range(0, 210)]
    assert cached <= CACHED_GROUPS

    # what this attempt generates is its own ("generated"), never compacted while it runs
    journal_calls(work, "refine", "run2", [range(500, 503)])
    again = GenerationJournal.open(work, "refine", "run2")
    assert again.earlier_count == len(answered) + 3
    assert len(files(folder)) == 2
    assert journaled_counts(work, "run2")["refine"] == {"replayed": len(answered),
                                                        "generated": 3}


def test_a_crash_between_writing_the_compacted_file_and_deleting_the_small_ones(
        local_ray, tmp_path, small_groups, monkeypatch):
    work = location(str(tmp_path / "_work"), None)
    folder = tmp_path / "_work" / "refine"
    journal_calls(work, "refine", "run1", [range(n * 3, n * 3 + 3) for n in range(10)])
    with monkeypatch.context() as crash:  # the driver dies right after the compacted file
        crash.setattr(journal_compact, "remove", lambda fs, paths: None)
        GenerationJournal.open(work, "refine", "run2")
    assert len(files(folder)) == 11  # the compacted file and every small one it copied
    journal_calls(work, "refine", "run2", [range(30, 34)])

    journal = GenerationJournal.open(work, "refine", "run3")
    assert journal.earlier_count == 34
    names = files(folder)
    assert len(names) == 2 and all(n.startswith(COMPACTED) for n in names)
    assert sorted(read_journal(work.join("refine"))["key"].to_pylist()) == \
        sorted(key(n) for n in range(34))
    assert journaled_counts(work, "run3") == {"refine": {"replayed": 34, "generated": 0}}
    found = journal.answers().get_many([key(n) for n in range(36)])
    assert found == [answer(n) for n in range(34)] + [None, None]


def test_lookups_hit_and_miss_across_compacted_files_and_row_groups(
        local_ray, tmp_path, small_groups):
    work = location(str(tmp_path / "_work"), None)
    for attempt in range(3):  # three attempts, three compacted files of several row groups
        journal_calls(work, "refine", f"run{attempt}",
                      [range(attempt * 100 + n * 4, attempt * 100 + n * 4 + 4)
                       for n in range(6)])
        journal = GenerationJournal.open(work, "refine", f"run{attempt + 1}")
    assert journal.earlier_count == 72
    assert sum(n.startswith(COMPACTED) for n in files(tmp_path / "_work" / "refine")) == 3
    index = journal.answers()
    known = [n for a in range(3) for n in range(a * 100, a * 100 + 24)]
    asked = [230, 3, 117, 203, 3, 50, 223, 0, 999]  # out of order, repeats, misses
    assert index.get_many([key(n) for n in asked]) == \
        [answer(n) if n in known else None for n in asked]
    assert key(110) in index and key(150) not in index and 42 not in index
    assert index[key(223)] == answer(223)
    with pytest.raises(KeyError):
        index[key(150)]
    assert index.get_many([]) == []
    assert len(index.cache) <= CACHED_GROUPS
    # another key with the same 64-bit hash is told apart by the full key
    twin = key(117)[:16] + "0" * 16
    assert index.get_many([twin, key(117)]) == [None, answer(117)]


def test_vectors_replay_bit_for_bit_from_compacted_files(local_ray, tmp_path, small_groups):
    work = location(str(tmp_path / "_work"), None)
    rng = np.random.default_rng(0)
    texts = [f"text {n}" for n in range(30)]
    vectors = rng.standard_normal((30, 5)).astype(np.float32)
    first = EmbeddingJournal(work.join("dedup_semantic"), "run1")
    for start in range(0, 30, 4):
        first.record([embedding_key("m", t) for t in texts[start:start + 4]],
                     list(vectors[start:start + 4]))
    second = EmbeddingJournal.open(work, "dedup_semantic", "run2")
    assert second.earlier_count == 30
    asked: list[str] = []

    def embed(batch: list[str]) -> np.ndarray:
        asked.extend(batch)
        return np.ones((len(batch), 5), np.float32)

    out = second.embed(embed, "m", [texts[29], "new", texts[0], texts[13]])
    assert asked == ["new"]
    assert out.tobytes() == np.stack([vectors[29], np.ones(5, np.float32), vectors[0],
                                      vectors[13]]).tobytes()


def test_an_unreadable_journal_file_is_skipped_with_a_warning(local_ray, tmp_path, caplog):
    work = location(str(tmp_path / "_work"), None)
    journal_calls(work, "refine", "run1", [range(0, 3), range(3, 5)])
    bad = tmp_path / "_work" / "refine" / "run1-broken.parquet"
    bad.write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING, logger="augment_ray.io"):
        journal = GenerationJournal.open(work, "refine", "run2")
    assert journal.earlier_count == 5
    assert any("run1-broken.parquet" in r.getMessage() for r in caplog.records)
    assert bad.exists()  # never deleted: what it held is asked again
    assert journal.answers().get_many([key(4), key(5)]) == [answer(4), None]


@pytest.mark.integration
def test_compaction_and_replay_on_an_object_store(local_ray, local_s3, small_groups):
    options = StorageOptions(endpoint=f"http://127.0.0.1:{local_s3.port}",
                             access_key_id_env=local_s3.key_id_env,
                             secret_access_key_env=local_s3.secret_env)
    work = location(f"s3://{local_s3.bucket}/journal-test/_work", options)
    journal_calls(work, "refine", "run1", [range(n * 5, n * 5 + 5) for n in range(5)])
    journal = GenerationJournal.open(work, "refine", "run2")
    assert journal.earlier_count == 25
    listed = local_s3.client().list_objects_v2(Bucket=local_s3.bucket,
                                               Prefix="journal-test/_work/refine/")
    # pyarrow keeps an empty "refine/" marker object as the folder
    names = [o["Key"].rsplit("/", 1)[-1] for o in listed["Contents"] if o["Size"]]
    assert len(names) == 1 and names[0].startswith(COMPACTED)
    assert journal.answers().get_many([key(24), key(25), key(0)]) == \
        [answer(24), None, answer(0)]
    assert journaled_counts(work, "run2") == {"refine": {"replayed": 25, "generated": 0}}


@ray.remote(max_restarts=1, max_task_retries=-1)
class JournalHolder:
    """What an engine actor does with its journal, in a real Ray actor Ray can restart."""

    def __init__(self, journal: GenerationJournal) -> None:
        self.journal = journal.for_this_actor()

    def answer(self, key: str) -> str | None:
        found = self.journal.answers().get(key)
        return found.text if found is not None else None

    def pid(self) -> int:
        import os

        return os.getpid()



def test_a_restarted_actor_replays_what_its_predecessor_journaled(local_ray, tmp_path):
    work = location(str(tmp_path / "_work"), None)
    journal = GenerationJournal.open(work, "refine", "run-now")
    holder = JournalHolder.remote(journal)
    # the first incarnation pays for an answer (journaled under this run's id), then dies
    journal.record(["paid"], [answer(1)])
    assert ray.get(holder.answer.remote("paid")) is None  # its index: earlier attempts only
    first = ray.get(holder.pid.remote())
    ray.kill(holder, no_restart=False)  # its process dies, as in an OOM or a lost node
    deadline = time.monotonic() + 60
    while ray.get(holder.pid.remote()) == first:  # until Ray has restarted it
        assert time.monotonic() < deadline, "the actor was not restarted"
        time.sleep(0.2)
    # the new incarnation (max_restarts=1) replays what this run journaled before it died
    assert ray.get(holder.answer.remote("paid")) == answer(1).text
