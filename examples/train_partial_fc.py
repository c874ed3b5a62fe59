"""Train an embedding model the way face recognition is trained, on synthetic
identities: a backbone under DDP, the classes sharded over the ranks by
PartialFC with any margin of the library, checkpoints that resume bit for bit,
and 1:1 verification on identities never seen in training.

    torchrun --nproc-per-node 2 examples/train_partial_fc.py                 # the default run (CPU: gloo)
    torchrun --nproc-per-node 2 examples/train_partial_fc.py --resume        # continue from --out's checkpoint
    python3 examples/train_partial_fc.py --steps 100                         # one process works too
    torchrun --nproc-per-node 2 examples/train_partial_fc.py --compare softmax,cosface,arcface

The pieces live in ``examples/partial_fc_recipe/`` (synthetic identities,
backbone, verification, checkpoints, report); this file is the run.

Writes, under ``--out``: ``run.json`` (arguments, the loss at every step,
every evaluation), ``run.png`` (loss and verification against steps; with
``--compare`` one ``compare.png`` of all runs) and ``checkpoint/``.

The data is generated, never downloaded: identity i is a smooth random image
fixed by (seed, i), and each of its samples is that image shifted, rotated,
rescaled, re-contrasted, partly occluded and noised, all drawn from a counter-
based hash of (seed, step, sample). A batch is a function of the step alone, so
any world size sees the same global batch and a resumed run the same data.
Identities [0, C) train; the next ``--eval-identities`` are held out for
verification.

Resume: every ``--checkpoint-every`` steps the run saves the backbone, its
optimizer and schedule, the head through ``PartialFC.save_sharded`` (with the
optimizer state of its weight), the margin's state and every RNG into a new
directory, then points ``checkpoint/latest`` at it. ``--resume`` continues
from there: at the same world size the following steps are bit-identical to a
run that never stopped; at another, the head is resharded and the run continues
the same loss (the backbone's norms are per sample and DDP sums gradients, so
nothing depends on how the batch is split).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn

import margin_kernels as mk
from partial_fc_recipe.backbone import Backbone
from partial_fc_recipe.checkpoints import load_checkpoint, save_checkpoint
from partial_fc_recipe.report import Progress, plot
from partial_fc_recipe.synthetic_faces import rank_rows, train_batch
from partial_fc_recipe.verification import evaluate


# ---------------------------------------------------------------- the run


@dataclass
class Config:
    margin: str = "arcface"
    margin_args: dict = field(default_factory=dict)
    subcenters: int = 1
    sample_rate: float = 1.0
    identities: int = 1000
    batch: int = 128  # global
    steps: int = 400
    embedding_size: int = 128
    image_size: int = 32
    width: int = 16
    optimizer: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup: int = 20
    clip: float = 5.0
    amp: str = "auto"
    eval_every: int = 100
    eval_identities: int = 200
    eval_samples: int = 4
    eval_negatives: int = 6000
    checkpoint_every: int = 100
    seed: int = 0
    backend: str = "auto"


def margin_family(name: str) -> type[mk.Margin]:
    """``--margin``: a family's short name (``margins.FAMILIES``), or softmax
    (normalized softmax, no margin) and elastic (ElasticArcFace)."""
    named = {spec.short_name: spec for spec in mk.margins.FAMILIES}
    named |= {"softmax": named["normsoftmax"], "elastic": named["elastic-arc"]}
    if name not in named:
        raise SystemExit(f"--margin must be one of {', '.join(sorted(named))}, got {name!r}")
    return named[name]


def margin_parameters(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(margin_family(name))}


def margin_spec(name: str, args: dict) -> mk.Margin:
    """The spec of family ``name`` with ``--margin-args``; a parameter the
    family does not take is an error that lists the ones it does."""
    unknown = sorted(set(args) - margin_parameters(name))
    if unknown:
        raise SystemExit(f"--margin-args: {name} takes {', '.join(sorted(margin_parameters(name)))}; "
                         f"not {', '.join(unknown)}")
    return margin_family(name)(**args)


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up, then cosine to 0 or polynomial (power 2, arcface_torch's PolyScheduler)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return (1 - progress) ** 2


class Run:
    """The modules, optimizers and schedules of one training run on this rank."""

    def __init__(self, cfg: Config, device: torch.device, world: int, rank: int) -> None:
        self.cfg, self.device, self.world, self.rank = cfg, device, world, rank
        torch.manual_seed(cfg.seed)  # the backbone's initialization, the same on every rank
        backbone = Backbone(cfg.embedding_size, cfg.image_size, cfg.width).to(device)
        self.backbone = backbone
        self.model = backbone
        if world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                backbone, device_ids=[device.index] if device.type == "cuda" else None)
            # Each rank's backward already gives its rows' share of the global
            # mean loss's gradient (PartialFC's loss is over the global batch):
            # the gradient is their sum, not DDP's mean.
            self.model.register_comm_hook(None, _allreduce_sum)
        self.generator = torch.Generator(device=device)
        self.head = mk.PartialFC(cfg.embedding_size, cfg.identities, margin_spec(cfg.margin, cfg.margin_args),
                                 sample_rate=cfg.sample_rate, subcenters=cfg.subcenters, device=device,
                                 backend=cfg.backend, generator=self.generator.manual_seed(cfg.seed))
        self.optimizer = _optimizer(cfg, backbone.parameters())
        self.head_optimizer = _optimizer(cfg, [self.head.weight])
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.head_schedule = torch.optim.lr_scheduler.LambdaLR(self.head_optimizer, lambda s: lr_factor(s, cfg))
        self.amp = cfg.amp == "on" or (cfg.amp == "auto" and device.type == "cuda")
        self.step = 0
        self.history: dict = {"loss": [], "evals": [], "seconds": 0.0}

    def train_step(self) -> float:
        cfg, step = self.cfg, self.step
        # the head's draws (sampled negatives, elastic margins) from (seed, step, rank): no state to carry
        self.generator.manual_seed(cfg.seed * 1_000_003 + step * 4099 + self.rank)
        images, labels = train_batch(step, rank_rows(cfg.batch, self.world, self.rank), cfg, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            embeddings = self.model(images)
        loss = self.head(embeddings.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip > 0:
            nn.utils.clip_grad_norm_(self.backbone.parameters(), cfg.clip)
        self.optimizer.step()
        self.head_optimizer.step()
        self.schedule.step()
        self.head_schedule.step()
        self.step += 1
        value = float(loss.detach())
        self.history["loss"].append(value)
        return value


def _optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _allreduce_sum(process_group, bucket):
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


# ---------------------------------------------------------------- training and the command line


def train(cfg: Config, out: str, device: torch.device, world: int, rank: int, *, resume: bool,
          stop_after: int | None, quiet: bool) -> dict:
    """One run: train (from ``out``'s checkpoint with ``resume``), evaluate,
    save; returns its history (the same on every rank)."""
    os.makedirs(out, exist_ok=True)
    run = Run(cfg, device, world, rank)
    ckpt = os.path.join(out, "checkpoint")
    progress = Progress(cfg.steps, 0, rank == 0 and not quiet)
    if resume:
        saved_world = load_checkpoint(run, ckpt)
        if saved_world is not None:
            progress.start = run.step
            progress.message(f"resumed at step {run.step} from {ckpt} (saved at world size {saved_world}, now {world})")
        else:
            progress.message(f"--resume: no checkpoint in {ckpt}, starting from step 0")
    t0 = time.perf_counter() - run.history["seconds"]
    last = min(cfg.steps, stop_after) if stop_after else cfg.steps
    if run.step == 0 and cfg.eval_every:
        _evaluate(run, progress, None)  # the untrained backbone: where the curve starts
    while run.step < last:
        loss = run.train_step()
        step = run.step
        if not math.isfinite(loss):
            raise SystemExit(f"the loss is {loss} at step {step}: lower --lr or raise --warmup")
        progress.update(step, loss, run.schedule.get_last_lr()[0])
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            _evaluate(run, progress, loss)
        run.history["seconds"] = time.perf_counter() - t0
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == last:
            save_checkpoint(run, ckpt)
    if rank == 0:
        record = {"config": asdict(cfg), "world_size": world, "device": str(device), **run.history}
        with open(os.path.join(out, "run.json"), "w") as f:
            json.dump(record, f)
        plot({cfg.margin: run.history}, os.path.join(out, "run.png"))
    return run.history


def _evaluate(run: Run, progress: Progress, loss: float | None) -> None:
    """Verification on rank 0, logged, into every rank's history."""
    if run.rank == 0:
        result = {"step": run.step, **evaluate(run.backbone, run.cfg, run.device, run.amp)}
        run.history["evals"].append(result)
        tar = result.get("tar@far=0.001")
        progress.message(f"step {run.step}: verification accuracy {result['accuracy']:.4f}"
                         + (f", TAR@FAR=1e-3 {tar:.4f}" if tar is not None else "")
                         + f" on {result['pairs_genuine']} + {result['pairs_impostor']} pairs of held-out identities"
                         + (f"; loss {loss:.3f}" if loss is not None else ""))
    _broadcast_history(run)


def _broadcast_history(run: Run) -> None:
    """Rank 0's evaluations to every rank (the history a checkpoint holds)."""
    if run.world > 1:
        box = [run.history["evals"]]
        dist.broadcast_object_list(box, src=0)
        run.history["evals"] = box[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/partial_fc", help="folder of run.json, run.png and checkpoint/")
    p.add_argument("--margin", default=d.margin, help="arcface, cosface, adaface, magface, curricular, elastic, "
                   "softmax, ... (default %(default)s)")
    p.add_argument("--margin-args", default="", help='the spec\'s parameters, e.g. "s=32,m=0.3"')
    p.add_argument("--compare", default="", help="several margins, one run each, drawn on one figure: "
                   "softmax,cosface,arcface")
    p.add_argument("--subcenters", type=int, default=d.subcenters)
    p.add_argument("--sample-rate", type=float, default=d.sample_rate, help="PartialFC's share of negatives")
    p.add_argument("--identities", type=int, default=d.identities, help="training identities C")
    p.add_argument("--batch", type=int, default=d.batch, help="the global batch, split over the ranks")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--embedding-size", type=int, default=d.embedding_size)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--width", type=int, default=d.width, help="the backbone's first width (x2, x4 after)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", choices=["cosine", "poly"], default=d.schedule)
    p.add_argument("--warmup", type=int, default=d.warmup, help="steps of linear warm-up")
    p.add_argument("--clip", type=float, default=d.clip, help="the backbone's gradient norm clip (0: none)")
    p.add_argument("--amp", choices=["auto", "on", "off"], default=d.amp, help="bf16 autocast (auto: on CUDA)")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-identities", type=int, default=d.eval_identities)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="photos per held-out identity")
    p.add_argument("--eval-negatives", type=int, default=d.eval_negatives, help="impostor pairs")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this step, as an interrupted run would")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backend", default=d.backend, help="the head's fused backend: auto, cpp, triton")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where CUDA is available")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace, margin: str, shared: bool = False) -> Config:
    """The run's configuration; with ``shared`` (``--compare``), each margin
    takes only the ``--margin-args`` its family has (s for all, m for most)."""
    margin_args = {}
    for item in filter(None, args.margin_args.split(",")):
        key, _, value = item.partition("=")
        margin_args[key.strip()] = float(value) if value.strip().replace(".", "", 1).lstrip("-").isdigit() else value
    if shared:
        margin_args = {k: v for k, v in margin_args.items() if k in margin_parameters(margin)}
    fields = {k: getattr(args, k) for k in Config.__dataclass_fields__ if hasattr(args, k)}
    return Config(**{**fields, "margin": margin, "margin_args": margin_args})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    margins = [m.strip() for m in args.compare.split(",") if m.strip()] or [args.margin]
    try:
        histories = {}
        for margin in margins:
            out = os.path.join(args.out, margin) if len(margins) > 1 else args.out
            if rank == 0 and not args.quiet:
                print(f"training {margin} on {world} rank(s), {device}: {args.identities} identities, global batch "
                      f"{args.batch}, {args.steps} steps -> {out}", file=sys.stderr)
            cfg = config_from(args, margin, shared=len(margins) > 1)
            histories[margin] = train(cfg, out, device, world, rank, resume=args.resume, stop_after=args.stop_after,
                                      quiet=args.quiet)
        if rank == 0 and len(margins) > 1:
            plot(histories, os.path.join(args.out, "compare.png"))
            for margin, history in histories.items():
                final = history["evals"][-1] if history["evals"] else {}
                print(f"{margin:>12}: accuracy {final.get('accuracy', float('nan')):.4f}  "
                      f"TAR@FAR=1e-3 {final.get('tar@far=0.001', float('nan')):.4f}")
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
