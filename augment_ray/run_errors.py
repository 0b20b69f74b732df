"""Errors of a run as the user should see them: our own error dug out of Ray's wrappers, and
Ray's failures (an engine actor that kept dying, a lost node, lost objects) as one paragraph that
says what was lost and what to do."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from augment_ray.errors import AugmentRayError, RunFailedError


@contextlib.contextmanager
def user_errors_unwrapped(max_actor_restarts: int | None = None) -> Iterator[None]:
    """Re-raise our own error from inside a Ray-wrapped one, so the user sees its message; an
    actor that died past its restarts becomes one clear RunFailedError."""
    try:
        yield
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is not None:
            raise user_error from None
        died = find_actor_death(error)
        if died is not None and max_actor_restarts is not None:
            raise RunFailedError(
                f"An engine actor died and was restarted {max_actor_restarts} times "
                f"(reliability.max_actor_restarts), then died again, so the run stopped: "
                f"{_first_line(died)}. Usual causes: out of memory (fewer replicas, a smaller "
                "batch_size or max_num_seqs), a crashing engine, a node lost. The output was not "
                "committed; a rerun replays the answers journaled so far."
            ) from None
        lost = find_lost_cluster_part(error)
        if lost is not None:
            raise RunFailedError(
                f"Part of the Ray cluster was lost while the run used it: {_first_line(lost)}. "
                "A lost node (a reclaimed spot instance, a crashed host) takes the tasks, actors "
                "and intermediate data it held with it; Ray retried what it could and this could "
                "not be recovered. The output was not committed; run the same command again once "
                "the cluster has its nodes back: answers journaled so far are replayed, nothing "
                "is written twice."
            ) from None
        raise


RAY_NOTES = ("Failed to apply UDF transform", "retried_map_errors")


def without_ray_notes(error: AugmentRayError) -> AugmentRayError:
    """Our error as we wrote it: Ray Data appends retry advice to a failed task's message."""
    lines = str(error).splitlines()
    cut = next((i for i, line in enumerate(lines) if any(n in line for n in RAY_NOTES)), None)
    if cut is None:
        return error
    return type(error)("\n".join(lines[:cut]).strip())


def first_of(error: BaseException, kinds: tuple[type[BaseException], ...]
             ) -> BaseException | None:
    """The first exception of `kinds` in `error`'s chain."""
    return next((e for e in chained_errors(error) if isinstance(e, kinds)), None)


def find_actor_death(error: BaseException) -> BaseException | None:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return first_of(error, (ActorDiedError, ActorUnavailableError, RayActorError))


def find_lost_cluster_part(error: BaseException) -> BaseException | None:
    """A node, a worker or intermediate objects lost (what a node's death leaves behind)."""
    from ray.exceptions import NodeDiedError, ObjectLostError, OwnerDiedError, WorkerCrashedError

    return first_of(error, (NodeDiedError, ObjectLostError, OwnerDiedError, WorkerCrashedError))


def chained_errors(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception it wraps (Ray's `cause`, __cause__, __context__), once each."""
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for linked in (getattr(current, "cause", None), current.__cause__, current.__context__):
            if isinstance(linked, BaseException):
                stack.append(linked)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def find_user_error(error: BaseException) -> AugmentRayError | None:
    """Ray wraps an exception raised in a task (RayTaskError, UserCodeException, ...); dig out the
    AugmentRayError inside so the user sees its message, not a remote traceback."""
    for current in chained_errors(error):
        # Ray's wrapper classes subclass the original type too; only the original is wanted
        if isinstance(current, AugmentRayError) and type(current).__module__.startswith(
            "augment_ray"
        ):
            return without_ray_notes(current)
    return None
