"""How training batches are formed: shuffled batches of similar lengths, micro-batches under a token
budget, and optionally padding-free rows.

* `LengthBuckets`: the data is shuffled, cut into pools of `pool_batches` batches, each pool sorted by length
  and cut into batches, and the batches shuffled again: little padding, and still a random order of batches.
  Seeded per epoch, so a resumed run sees the same batches.
* `micro_batches`: a batch whose padded size exceeds the token budget is run as several forward/backward
  passes over groups of rows, each trimmed to its own longest row. The loss of each is normalised by the
  whole batch's answer-token count, so the summed gradient is the batch's gradient; only the activation
  memory of one group is alive at a time. Every pass but the last runs under `accumulating`, so a process
  syncs its gradients once per batch however many passes its batch needs (see there).
* `padding_free`: the rows of a (micro-)batch joined into one row, position ids restarting at every sample.
  transformers keeps the samples apart from those position ids: a block-diagonal mask for sdpa and eager
  attention, variable-length kernels for flash attention. No padding is computed, but with a mask the
  attention spans the joined row, which on CPU costs more than the padding it saves (bench/README.md).
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.utils.data import Sampler

from llamatailor.data.templating import IGNORE_INDEX


class LengthBuckets(Sampler[int]):
    """Row indices in batches of similar lengths, in a seeded random order (see the module docstring).

    Args:
        lengths: Tokens per row of the dataset.
        batch_size: Rows per batch as bucketed: the global batch (per-device batch x processes).
        seed: With the epoch (`set_epoch`, called by the Trainer), seeds the shuffles.
        pool_batches: Batches per pool sorted by length; larger pools pad less and mix less.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, pool_batches: int = 64) -> None:
        self.lengths, self.batch_size, self.seed, self.pool_batches = lengths, batch_size, seed, pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, len(order), pool):
            ranked = sorted(order[start : start + pool], key=lambda i: self.lengths[i], reverse=True)
            batches += [ranked[i : i + self.batch_size] for i in range(0, len(ranked), self.batch_size)]
        for position in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[position]


def micro_batches(inputs: dict[str, Any], budget: int) -> list[dict[str, Any]]:
    """Groups of rows with at most `budget` padded tokens each (at least one row), each trimmed to its
    longest row; the batch itself when it fits. Assumes right padding (the collator's).

    Args:
        inputs: A collated batch: `input_ids`, `labels`, `attention_mask`, each (batch, seq); other
            tensors with `batch` rows are split alike (and cut to the group's width when `seq` wide).
        budget: Padded tokens (rows x width) per group; a longer single row is a group of its own.

    Returns:
        The groups, longest rows first, each a dict of the same keys, (rows, width) where width is the
        group's longest row; `[inputs]` when `batch x seq <= budget` or there is no attention mask.
    """
    ids = inputs["input_ids"]
    if ids.numel() <= budget or "attention_mask" not in inputs:
        return [inputs]
    lengths = inputs["attention_mask"].sum(dim=1)
    rows = sorted(range(ids.size(0)), key=lambda r: int(lengths[r]), reverse=True)
    groups: list[list[int]] = []
    for row in rows:
        if groups and (len(groups[-1]) + 1) * int(lengths[groups[-1][0]]) <= budget:
            groups[-1].append(row)
        else:
            groups.append([row])
    return [_rows(inputs, group, int(lengths[group[0]])) for group in groups]


@contextlib.contextmanager
def accumulating(accelerator: Accelerator, model: torch.nn.Module) -> Iterator[None]:
    """A forward/backward pass whose gradients are only accumulated: no all-reduce (DDP and FSDP `no_sync`)
    and not a gradient-accumulation boundary (DeepSpeed steps its engine at each boundary). This is how
    transformers' `Trainer._run_epoch` runs every accumulated batch but the last (transformers 5.23, which
    also leaves DeepSpeed out of `no_sync`). Under DDP each backward outside it all-reduces, so processes
    whose batches split into different numbers of passes would otherwise run different numbers of
    collectives, and hang or add unrelated gradients. Nested in the Trainer's own `no_sync`, it restores it.

    It sets accelerate 1.15's private `GradientState._set_sync_gradients`, as the Trainer does. Changing
    it, or moving to another transformers or accelerate version, needs the parity tests, the DDP test and
    a planner re-measure (train/sft.py's docstring).
    """
    state = accelerator.gradient_state
    syncing = state.sync_gradients
    state._set_sync_gradients(False)
    try:
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            yield
        else:
            with accelerator.no_sync(model):
                yield
    finally:
        state._set_sync_gradients(syncing)


def _rows(inputs: dict[str, Any], rows: list[int], width: int) -> dict[str, Any]:
    index = torch.tensor(rows)
    batch, seq = inputs["input_ids"].shape
    part = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.size(0) == batch:
            value = value.index_select(0, index.to(value.device))
            if value.dim() >= 2 and value.size(1) == seq:
                value = value[:, :width]
        part[key] = value
    return part


def padding_free(inputs: dict[str, Any]) -> dict[str, Any]:
    """A right-padded batch as one row of its real tokens, with position ids and no attention mask. The
    first token of every sample is unlabelled, so no sample learns to predict the next one; that label is
    never scored in the padded batch either, so the loss is the same.

    Args:
        inputs: `input_ids`, `labels` and `attention_mask`, each (batch, seq), right-padded; other keys
            are dropped.

    Returns:
        `input_ids`, `labels` and `position_ids`, each (1, tokens) int64, where tokens is the number of
        real (unmasked) tokens; as transformers' `DataCollatorWithFlattening` lays packed samples out.
    """
    real = inputs["attention_mask"].bool()
    positions = (real.cumsum(dim=1) - 1)[real][None]
    labels = inputs["labels"][real][None].masked_fill(positions == 0, IGNORE_INDEX)
    return {"input_ids": inputs["input_ids"][real][None], "labels": labels, "position_ids": positions}
