"""Data parallelism of ``vtc eval``: under ``accelerate launch --multi_gpu --num_processes N`` (or ``vtc eval
--num-processes N``, or torchrun) the pending questions of a method are cut into the batches a single process
would run and whole batches are dealt to the processes (``batches[rank::world]``), so every question sees exactly
the batch it would see alone and the gathered predictions equal the single-process run."""

from __future__ import annotations

import os

import torch

__all__ = ["distributed", "deal", "gather_records", "barrier", "broadcast"]


def distributed(device: str):
    """(state | None, rank, world): accelerate's PartialState when launched with several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, 0, 1
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    return state, state.process_index, state.num_processes


def deal(items: list, size: int, rank: int = 0, world: int = 1) -> list[list]:
    """This process's batches: ``items`` cut into batches of ``size``, every ``world``-th from ``rank``."""
    return [items[i:i + size] for i in range(0, len(items), size)][rank::world]


def barrier(state) -> None:
    if state is not None:
        state.wait_for_everyone()


def gather_records(state, records: list[dict]) -> list[dict]:
    """Every process's records, on every process (``records`` itself without a distributed state)."""
    if state is None:
        return records
    from accelerate.utils import gather_object

    return [r for part in gather_object([records]) for r in part]


def broadcast(state, value):
    """Rank 0's ``value`` on every process."""
    if state is None:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]
