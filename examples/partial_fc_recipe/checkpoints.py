"""Checkpoints of a training run: a new directory per save, ``latest``
pointed at it last. ``run`` below is the training run
(``train_partial_fc.Run``): its modules, optimizers, schedules, step, history."""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict

import torch
import torch.distributed as dist


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(run, root: str) -> str:
    """A new directory per save, ``latest`` pointed at it last: a run killed
    mid-save resumes from the previous one. A collective."""
    path = os.path.join(root, f"step_{run.step:08d}")
    run.head.save_sharded(os.path.join(path, "head"), optimizer=run.head_optimizer)  # (creates ``path``)
    _atomic_save({"world_size": run.world, "rng": _rng_state(run.device)}, os.path.join(path, f"rng_{run.rank}.pt"))
    if run.rank == 0:
        _atomic_save({"step": run.step, "world_size": run.world, "config": asdict(run.cfg),
                      "backbone": run.backbone.state_dict(), "optimizer": run.optimizer.state_dict(),
                      "schedule": run.schedule.state_dict(), "head_schedule": run.head_schedule.state_dict(),
                      # the head optimizer's settings (its learning rate now); its per-class state is in head/
                      "head_optimizer_groups": _groups(run.head_optimizer),
                      "history": run.history}, os.path.join(path, "train.pt"))
    _barrier(run.world)
    if run.rank == 0:
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(os.path.basename(path))
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        for old in os.listdir(root):  # earlier saves, now that ``latest`` moved on
            if old.startswith("step_") and old != os.path.basename(path):
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier(run.world)
    return path


def _groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's settings per parameter group (learning rate, momentum...), without the parameters."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def load_checkpoint(run, root: str) -> int | None:
    """Continue from ``root/latest``: the world size it was saved at, None
    when there is no checkpoint. Every RNG is
    restored where the world size is the checkpoint's (the head's draws come
    from the step anyway)."""
    latest = os.path.join(root, "latest")
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        path = os.path.join(root, f.read().strip())
    train = torch.load(os.path.join(path, "train.pt"), map_location=run.device, weights_only=False)
    saved = {k: v for k, v in train["config"].items() if k not in ("steps", "eval_every", "checkpoint_every")}
    mine = {k: v for k, v in asdict(run.cfg).items() if k in saved}
    if saved != mine:
        changed = sorted(k for k in saved if saved[k] != mine[k])
        raise SystemExit(f"--resume: the checkpoint was trained with other settings ({', '.join(changed)})")
    run.backbone.load_state_dict(train["backbone"])
    run.optimizer.load_state_dict(train["optimizer"])
    run.schedule.load_state_dict(train["schedule"])
    run.head_schedule.load_state_dict(train["head_schedule"])
    run.head.load_sharded(os.path.join(path, "head"), optimizer=run.head_optimizer)
    for group, saved in zip(run.head_optimizer.param_groups, train["head_optimizer_groups"]):
        group.update(saved)
    run.step, run.history = train["step"], train["history"]
    rng_file = os.path.join(path, f"rng_{run.rank}.pt")
    if train["world_size"] == run.world and os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=False)["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and run.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], run.device)
    return train["world_size"]


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
