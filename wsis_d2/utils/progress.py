"""
Progress lines with an ETA for long inference loops, in the style of detectron2's
``inference_on_dataset`` ("Inference done 11/500. ... ETA=0:00:57"): wrap the loop's iterable,

    for batch in progress(data_loader, "CCGR pseudo labels"):
        ...

and a line is logged at most every ``every_s`` seconds, plus one at the end of a loop that took
longer than that. The time of an item includes the loop body's work on it (the generator resumes
only when the body asks for the next item).
"""

import datetime
import logging
import time
from typing import Iterable, Iterator, Optional, TypeVar

__all__ = ["progress"]

T = TypeVar("T")

_logger = logging.getLogger(__name__)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def progress(
    iterable: Iterable[T],
    name: str,
    total: Optional[int] = None,
    every_s: float = 10.0,
    unit: str = "it",
    logger: Optional[logging.Logger] = None,
) -> Iterator[T]:
    """
    Yield the items of ``iterable``, logging "``name``: done i/total. s/``unit``. ETA=h:mm:ss" at
    most every ``every_s`` seconds (INFO) and a final line when the loop ran longer than that.

    Args:
        iterable: the loop's items (a data loader, a list ...).
        name: what the loop does, first on each line.
        total: number of items; None: ``len(iterable)`` where it has one (else no ETA).
        every_s: seconds between two lines (> 0).
        unit: the name of one item in the lines ("batch", "image").
        logger: where to log; None: this module's logger (child of "wsis_d2").
    """
    if not every_s > 0:
        raise ValueError(f"progress: 'every_s' must be > 0, got {every_s!r}")
    log = logger or _logger
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last < every_s:
            continue
        last = now
        per = (now - start) / done
        if total:
            eta = per * max(total - done, 0)
            log.info(f"{name}: done {done}/{total}. {per:.4f} s/{unit}. ETA={_clock(eta)}")
        else:
            log.info(f"{name}: done {done}. {per:.4f} s/{unit}. elapsed {_clock(now - start)}")
    elapsed = time.perf_counter() - start
    if elapsed >= every_s:
        log.info(
            f"{name}: finished {done} {unit} in {_clock(elapsed)} "
            f"({elapsed / max(done, 1):.4f} s/{unit})"
        )
