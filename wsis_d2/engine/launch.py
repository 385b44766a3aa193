"""
``launch``: detectron2's multi-process entry point, also on CPU and with detectron2 v0.6.

detectron2's ``launch`` spawns one process per GPU and joins them with NCCL. On CPU, v0.6's asserts
CUDA, and main's uses gloo but leaves the threads of every process at the machine's core count.
Here a CUDA device goes to detectron2's own ``launch``, unchanged; a CPU device spawns the processes
here, joins them with gloo and gives each an equal share of the cores. Both paths set up what
detectron2's ``comm`` needs (world, rank, the local process group), so ``DefaultTrainer``, the
samplers and the evaluators work as in GPU training.

    launch(main, 2, args=(args,), device="cpu")        # 2 processes on this machine
    launch(main, 2, num_machines=2, machine_rank=0, dist_url="tcp://10.0.0.1:29500",
           args=(args,), device="cpu")                 # 2 machines, 2 processes each
"""

import gc
import logging
import os
import socket
from datetime import timedelta
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

__all__ = ["DEFAULT_TIMEOUT", "check_device", "destroy_process_groups", "launch"]

DEFAULT_TIMEOUT = timedelta(minutes=30)


def check_device(device: str) -> None:
    """
    Fail at start-up, with what to do, when ``MODEL.DEVICE`` names a CUDA device that torch cannot
    use (rather than deep inside torch with "Found no NVIDIA driver" once the model is built).
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"MODEL.DEVICE is {device!r}, but torch sees no CUDA GPU on this machine "
            "(torch.cuda.is_available() is False). To run on the CPU, add `MODEL.DEVICE cpu` at "
            "the end of the command line (or set MODEL.DEVICE: \"cpu\" in the config)."
        )


def launch(
    main_func: Callable,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: str = "cuda",
):
    """
    Run ``main_func(*args)`` in ``num_processes_per_machine`` processes on each of
    ``num_machines`` machines (call it on every machine), or directly when there is one process
    in all.

    Args:
        num_processes_per_machine: ``--num-gpus`` of detectron2's argument parser; on CPU the
            number of processes.
        dist_url: "tcp://host:port" of the rank-0 machine, or "auto" (a free local port; one
            machine only).
        device: ``MODEL.DEVICE``. "cuda..." → detectron2's launch (NCCL, one GPU per process;
            a clear error at once where torch sees no GPU, :func:`check_device`); "cpu" → gloo,
            and ``torch.set_num_threads(cores // processes)`` in every process unless
            ``OMP_NUM_THREADS`` is set.
    """
    check_device(device)
    if num_processes_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"launch: --num-gpus ({num_processes_per_machine}) and --num-machines "
            f"({num_machines}) must be at least 1"
        )
    if torch.device(device).type != "cpu":
        return detectron2_launch(
            main_func,
            num_processes_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url is None or dist_url == "auto":
        if num_machines > 1:
            raise ValueError("launch: several machines need --dist-url tcp://<rank-0 host>:<port>")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.start_processes(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, num_machines, num_processes_per_machine, machine_rank, dist_url, args,
              timeout),
        daemon=False,
        start_method="spawn",
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_worker(
    local_rank, main_func, num_machines, per_machine, machine_rank, dist_url, args, timeout
):
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_machine))
    try:
        dist.init_process_group(
            backend="gloo",
            init_method=dist_url,
            world_size=num_machines * per_machine,
            rank=machine_rank * per_machine + local_rank,
            timeout=timeout,
        )
    except Exception:
        logging.getLogger(__name__).error("process group URL: %s", dist_url)
        raise
    _create_local_process_group(num_machines, per_machine, machine_rank)
    comm.synchronize()
    try:
        main_func(*args)
        # no process tears its groups down while another still talks through them
        comm.synchronize()
    finally:
        destroy_process_groups()


def destroy_process_groups() -> None:
    """
    Destroy every process group of this process *and* free the group objects now.

    ``dist.destroy_process_group()`` shuts the groups down, but a group object that Python still
    holds keeps its gloo threads until it is freed; detectron2's ``comm`` holds two (the local
    group, and ``_get_global_gloo_group``'s cached WORLD). Freed only at interpreter exit, their
    threads were destroyed while still joinable: "terminate called without an active exception",
    SIGABRT after training had finished (2 of about 150 runs of tests/engine/test_launch.py).
    """
    comm._LOCAL_PROCESS_GROUP = None
    for name in ("_get_global_gloo_group", "create_local_process_group"):  # lru_cache'd in comm
        cached = getattr(comm, name, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # the groups' destructors join their threads here, not at interpreter exit


def _create_local_process_group(num_machines: int, per_machine: int, machine_rank: int):
    """The group of this machine's processes, which ``comm.get_local_rank`` / ``get_local_size``
    read: detectron2 main creates it with ``comm.create_local_process_group``; v0.6 has no such
    function (its launch sets ``comm._LOCAL_PROCESS_GROUP`` itself), so it is set the same way."""
    if hasattr(comm, "create_local_process_group"):  # detectron2 main
        comm.create_local_process_group(per_machine)
        return
    for i in range(num_machines):  # detectron2 v0.6; every rank creates every group, in order
        group = dist.new_group(list(range(i * per_machine, (i + 1) * per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
