"""
CCGR's stages on several processes and machines, on detectron2's ``comm`` (the processes started by
:func:`wsis_d2.engine.launch`: detectron2's ``launch`` with NCCL on GPUs, gloo on CPU).

- Training stages need nothing here: ``WSISTrainer`` wraps the model in DistributedDataParallel and
  detectron2's ``TrainingSampler`` gives every rank its share of ``SOLVER.IMS_PER_BATCH``.
- Inference stages run on each rank's share of the images (the ``InferenceSampler`` of detectron2's
  test loaders, or :func:`shard`); :func:`gather_by_id` collects the per-image results on the main
  process in dataset order, checking that every image was computed exactly once; the main process
  alone writes the stage's files.
- :func:`from_main` gives every rank the main process's value (or raises its exception on every
  rank), so that all ranks agree on which stages are done and stop at the same health check.

All processes must see ``OUTPUT_DIR`` on one file system (checkpoints, stage files and the
previous stage's outputs are written by the main process and read by all):
:func:`check_shared_output`.
"""

import logging
import os
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

import numpy as np
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..data.proposals import save_proposal_file
from .stages import proposals_of

__all__ = [
    "check_shared_output",
    "distributed_proposal_file",
    "from_main",
    "gather_by_id",
    "main_first",
    "seed_stage",
    "serial_part",
    "shard",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def shard(items: Sequence[T]) -> List[T]:
    """This rank's share of ``items``: ``items[rank::world_size]`` (each item on one rank)."""
    return list(items[comm.get_rank() :: comm.get_world_size()])


def seed_stage(seed: int) -> None:
    """
    Seed this process with ``seed + rank`` (as ``default_setup`` does) at the start of a stage, so
    that the stage's randomness (initial weights, the data order, which detectron2's
    ``TrainingSampler`` draws from rank 0's RNG, augmentation) does not depend on how many images
    earlier stages drew for on this process: 1 and N processes, or a resumed and an uninterrupted
    run, start each stage alike. ``seed`` < 0: not reseeded.
    """
    if seed >= 0:
        seed_all_rng(seed + comm.get_rank())


@contextmanager
def serial_part(record: List[float]):
    """
    Time the block (gathering to the main process, its writing and evaluating) into ``record``:
    the part of an inference stage that more processes do not shorten. Starts once every rank has
    finished its share, so that waiting for the slowest rank is not counted.
    """
    comm.synchronize()
    start = time.perf_counter()
    try:
        yield
    finally:
        record.append(time.perf_counter() - start)


def from_main(fn: Callable[[], T]) -> T:
    """
    Run ``fn`` on the main process only and return its value on every rank; an exception raised
    by ``fn`` is raised on every rank (the others would otherwise wait for the main process until
    the process group's timeout).
    """
    result = None
    if comm.is_main_process():
        try:
            result = (True, fn())
        except Exception as exc:  # re-raised below, on every rank
            result = (False, exc)
    ok, value = comm.all_gather(result)[0]
    if not ok:
        raise value
    return value


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on the main process, then on the others: a dataset that writes its files on first
    use (e.g. the synthetic splits) is generated once, not by several processes at once."""
    if comm.is_main_process():
        value = fn()
    comm.synchronize()
    if not comm.is_main_process():
        value = fn()
    return value


def gather_by_id(local: Dict[Any, Any], ids: Sequence, what: str) -> Optional["OrderedDict"]:
    """
    Collect every rank's ``{image_id: result}`` on the main process.

    Args:
        local: this rank's results, one per image of its share.
        ids: the image ids of the whole dataset, in dataset order.
        what: the stage, for the error message.

    Returns:
        On the main process ``{image_id: result}`` in the order of ``ids``; ``None`` on the
        others.

    Raises:
        ValueError (on the main process): an image computed by two ranks, or by none.
    """
    parts = comm.gather(local, dst=0)
    if not comm.is_main_process():
        return None
    merged = {}
    for rank, part in enumerate(parts):
        twice = [i for i in part if i in merged]
        if twice:
            raise ValueError(f"{what}: image ids {twice[:5]} computed by rank {rank} and another")
        merged.update(part)
    missing = [i for i in ids if i not in merged]
    extra = set(merged) - set(ids)
    if missing or extra:
        raise ValueError(
            f"{what}: {len(missing)} training images without a result (e.g. {missing[:5]}), "
            f"{len(extra)} results for images not in the dataset (e.g. {sorted(extra)[:5]})"
        )
    return OrderedDict((i, merged[i]) for i in ids)


def check_shared_output(folder: str) -> None:
    """
    Fail at start, naming ``folder`` (``OUTPUT_DIR``), when some process cannot read a file the
    main process wrote there: a multi-machine run needs ``OUTPUT_DIR`` on a shared file system.
    """
    if comm.get_world_size() == 1:
        return
    os.makedirs(folder, exist_ok=True)
    token = from_main(lambda: uuid.uuid4().hex)
    path = os.path.join(folder, f".shared_check_{token}")
    if comm.is_main_process():
        with open(path, "w") as f:
            f.write(token)
    comm.synchronize()
    seen = False
    if os.path.isfile(path):
        with open(path) as f:
            seen = f.read() == token
    blind = [r for r, s in enumerate(comm.all_gather(seen)) if not s]
    comm.synchronize()
    if comm.is_main_process():
        os.remove(path)
    if blind:
        raise ValueError(
            f"OUTPUT_DIR {folder!r}: ranks {blind} cannot read the files the main process writes "
            "there; put OUTPUT_DIR on a file system shared by all machines"
        )


def distributed_proposal_file(
    path: str,
    dataset_dicts: List[Dict],
    generator: Callable[[np.ndarray], tuple],
    workers: int = 0,
    decode_short_side: int = 0,
) -> Dict[str, float]:
    """
    :func:`wsis_d2.ccgr.stages.make_proposal_file` with the images split across the ranks
    (:func:`shard`); the main process writes ``path``. Every rank returns the same figures.
    ``decode_short_side``: as in :func:`wsis_d2.ccgr.stages.proposals_of`.

    Returns:
        {"images", "seconds" (wall time from the first rank's start to the written file),
        "images_per_s", "boxes_per_image", "serial_seconds" (gathering and writing the file on
        the main process, after the last rank finished its share)}.
    """
    comm.synchronize()
    start = time.perf_counter()
    mine = shard(dataset_dicts)
    boxes, logits, _ = proposals_of(
        mine, generator, workers=workers, decode_short_side=decode_short_side
    )
    local = {d["image_id"]: (b, s) for d, b, s in zip(mine, boxes, logits)}
    comm.synchronize()
    parallel_end = time.perf_counter()
    ids = [d["image_id"] for d in dataset_dicts]
    merged = gather_by_id(local, ids, f"proposals ({path})")

    def write():
        boxes_all = [b for b, _ in merged.values()]
        save_proposal_file(path, ids, boxes_all, [s for _, s in merged.values()])
        end = time.perf_counter()
        n = len(ids)
        return {
            "images": n,
            "seconds": end - start,
            "images_per_s": n / (end - start) if end > start else float("nan"),
            "boxes_per_image": float(np.mean([len(b) for b in boxes_all])) if n else 0.0,
            "serial_seconds": end - parallel_end,
        }

    return from_main(write)
