"""Helpers to run a function on N gloo ranks spawned on 127.0.0.1, with a timeout."""
from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    status = 1
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        # No rank tears gloo down while a peer still has traffic in flight: a
        # closed pair aborts the peer's background thread.
        dist.barrier()
        status = 0
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        dist.destroy_process_group()
        # Leave without running C++ static destructors at interpreter exit: gloo's
        # background threads could still abort the process there (SIGABRT, about
        # one run in ten), after the result was saved.
        os._exit(status)


def run_ranks(fn, world: int, *args, outdir: str, timeout: float = 180.0) -> list:
    """fn(rank, world, *args) on each rank; returns the ranks' results in order."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, outdir)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = {r: open(os.path.join(outdir, f"rank{r}.err")).read() for r in range(world)
              if os.path.exists(os.path.join(outdir, f"rank{r}.err"))}
    assert not hung, f"ranks {hung} did not finish within {timeout} s"
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in errors.items())
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]
