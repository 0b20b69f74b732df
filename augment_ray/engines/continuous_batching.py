"""Slot refill (continuous batching) for the transformers engine: a decode loop over one batched
KV cache where a finished answer leaves its slot and the next queued prompt is prefilled into it,
so no batch waits for its longest answer.

The cache is a DynamicCache whose per-layer key/value tensors are left-padded to one length:
finished rows are dropped with index_select, newly prefilled rows are left-padded to the
batch's length (or the batch to theirs) and concatenated, and the columns every row masks are
cropped. Positions follow the attention mask as `generate` derives them, so each row sees what
it would see alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from augment_ray.config.base import SamplingParams

# refill when this share of the slots is free (or the queue fits): a prefill forward per freed
# slot would cost more than the idle slots it fills
REFILL_SHARE = 0.25


@dataclass
class Answer:
    tokens: list[int] = field(default_factory=list)  # generated ids, the stop token included
    stopped: bool = False  # ended with a stop token (else ran to max_tokens)


# (prompt index, its answer) as soon as the answer is finished
OnFinish = Callable[[int, Answer], None]


class SlotBatch:
    """The rows being decoded: their prompt indices, KV cache, attention mask (cache columns
    plus the token fed next), next positions and next input tokens."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.cache: Any = None
        self.mask: Any = None
        self.positions: Any = None
        self.next_tokens: Any = None

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, keep: list[int]) -> None:
        """Only the rows at positions `keep`, the columns no kept row attends to cropped."""
        import torch

        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.positions = self.next_tokens = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.next_tokens = self.next_tokens.index_select(0, index)
        # the mask's last column is the token fed next, not yet in the cache
        used = self.mask[:, :-1].any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1] - 1
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def extend(self, other: SlotBatch) -> None:
        """Append `other`'s rows, the shorter cache left-padded to the longer one's length."""
        import torch

        if not self.rows:
            self.__dict__.update(other.__dict__)
            return
        width, other_width = self.mask.shape[1], other.mask.shape[1]
        self.mask = torch.cat([_pad_left(self.mask, other_width - width),
                               _pad_left(other.mask, width - other_width)])
        for layer, new in zip(self.cache.layers, other.cache.layers, strict=True):
            layer.keys = torch.cat([_pad_left(layer.keys, other_width - width, dim=2),
                                    _pad_left(new.keys, width - other_width, dim=2)])
            layer.values = torch.cat([_pad_left(layer.values, other_width - width, dim=2),
                                      _pad_left(new.values, width - other_width, dim=2)])
        self.positions = torch.cat([self.positions, other.positions])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.rows += other.rows


def _pad_left(tensor: Any, amount: int, dim: int = 1) -> Any:
    import torch

    if amount <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = amount
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class SlotDecoder:
    """Greedy or sampled decoding of many prompts through `slots` rows at a time."""

    def __init__(self, model: Any, stop_ids: list[int], pad_id: int, slots: int,
                 max_batch_tokens: int) -> None:
        self.model = model
        self.stop_ids = set(stop_ids)
        self.pad_id = pad_id
        self.slots = slots
        self.max_batch_tokens = max_batch_tokens
        self.device = model.device

    def run(self, prompts: dict[int, list[int]], sampling: SamplingParams,
            on_finish: OnFinish, after_step: Callable[[], None] = lambda: None) -> None:
        """Decode every prompt ({index: token ids}); `on_finish` hears of each answer once it
        ends, `after_step` is called after every forward pass. Prompts are admitted shortest
        first, as the static batches sort them."""
        import torch

        queue = deque(sorted(prompts, key=lambda i: len(prompts[i])))
        answers = {index: Answer() for index in prompts}
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        batch = SlotBatch()
        refill_at = max(1, round(self.slots * REFILL_SHARE))
        with torch.inference_mode():
            while queue or batch:
                free = self.slots - len(batch)
                if queue and free >= min(refill_at, len(queue)):
                    admitted = self._admit(queue, prompts, batch, sampling, generator)
                    if admitted is not None:
                        # the prefill chose each new row's first token: it may already end it
                        self._take(admitted, answers, sampling, on_finish)
                        batch.extend(admitted)
                        after_step()
                        if not batch:
                            continue
                logits = self.model(
                    input_ids=batch.next_tokens[:, None],
                    attention_mask=batch.mask,
                    position_ids=batch.positions[:, None],
                    past_key_values=batch.cache,
                    use_cache=True,
                ).logits[:, -1]
                batch.positions = batch.positions + 1
                batch.next_tokens = self._choose(logits, sampling, generator)
                batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], 1)
                self._take(batch, answers, sampling, on_finish)
                after_step()

    def _admit(self, queue: deque[int], prompts: dict[int, list[int]], batch: SlotBatch,
               sampling: SamplingParams, generator: Any) -> SlotBatch | None:
        """Prefill the next queued prompts into a batch of their own, each with its first token
        chosen: as many as there are free slots while the whole batch stays within
        max_batch_tokens padded prompt tokens (every row is padded to the longest: one long
        prompt must not widen 31 others' caches). None when none fits yet."""
        import torch
        from transformers import DynamicCache

        chosen: list[int] = []
        widest = max((len(prompts[i]) for i in batch.rows), default=0)
        while queue and len(batch) + len(chosen) < self.slots:
            width = max(widest, len(prompts[queue[0]]))  # sorted: the newest is the longest
            if (batch or chosen) and (
                    len(batch) + len(chosen) + 1) * width > self.max_batch_tokens:
                break
            chosen.append(queue.popleft())
        if not chosen:
            return None
        width = max(len(prompts[i]) for i in chosen)
        input_ids = torch.full((len(chosen), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, index in enumerate(chosen):
            ids = prompts[index]
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        # as generate derives them: 0.. over the real tokens, 0 on the padding
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        batch = SlotBatch()
        batch.rows = chosen
        batch.cache = cache
        batch.positions = positions[:, -1] + 1
        batch.next_tokens = self._choose(logits[:, -1], sampling, generator)
        batch.mask = torch.cat([mask, mask.new_ones((len(chosen), 1))], 1)
        return batch

    def _choose(self, logits: Any, sampling: SamplingParams, generator: Any) -> Any:
        import torch

        if sampling.temperature <= 0:
            return logits.argmax(-1)
        scores = logits.float() / sampling.temperature
        if sampling.top_p < 1.0:
            # nucleus as transformers' TopPLogitsWarper: drop the least likely tokens whose
            # cumulative probability stays within 1 - top_p, always keeping the most likely
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= (1 - sampling.top_p)
            drop[:, -1] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probs = scores.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    def _take(self, batch: SlotBatch, answers: dict[int, Answer], sampling: SamplingParams,
              on_finish: OnFinish) -> None:
        """Record each row's newly chosen token; finished rows leave the batch."""
        keep = []
        for row, (index, token) in enumerate(zip(batch.rows, batch.next_tokens.tolist(),
                                                 strict=True)):
            answer = answers[index]
            answer.tokens.append(token)
            answer.stopped = token in self.stop_ids
            if answer.stopped or len(answer.tokens) >= sampling.max_tokens:
                on_finish(index, answer)
            else:
                keep.append(row)
        batch.keep(keep)
