"""Train an embedding model the way face recognition is trained, on synthetic
identities: a backbone under DDP, the classes sharded over the ranks by
PartialFC with any margin of the library, checkpoints that resume bit for bit,
and 1:1 verification on identities never seen in training.

    torchrun --nproc-per-node 2 examples/train_partial_fc.py                 # the default run (CPU: gloo)
    torchrun --nproc-per-node 2 examples/train_partial_fc.py --resume        # continue from --out's checkpoint
    python3 examples/train_partial_fc.py --steps 100                         # one process works too
    torchrun --nproc-per-node 2 examples/train_partial_fc.py --compare softmax,cosface,arcface

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
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import margin_kernels as mk
from margin_kernels.partial_fc import class_split

# ---------------------------------------------------------------- data

_M32 = 0xFFFFFFFF
# streams of the hash: what a uniform is drawn for
_PROTOTYPE, _DETAIL, _LABEL, _AUGMENT, _NOISE, _EVAL, _PAIRS = range(1, 8)


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer finalizer on int64 tensors (every product stays below 2^63)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def hash_uniform(*counters, device=None) -> Tensor:
    """Uniforms in [0, 1) from non-negative integer counters (ints or int64
    tensors, broadcast together): the same values on every device, at every
    world size, with no generator state."""
    x = torch.zeros((), dtype=torch.int64, device=device)
    for c in counters:
        c = torch.as_tensor(c, dtype=torch.int64, device=device)
        x = _mix(x + (c & _M32) + 0x9E3779B9)
    return (x.to(torch.float64) / 2.0**32).float()


def hash_normal(*counters, device=None) -> Tensor:
    """Standard normals by Box-Muller from two hashed uniforms."""
    u1 = hash_uniform(*counters, 0, device=device).clamp_min(1e-7)
    u2 = hash_uniform(*counters, 1, device=device)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def prototypes(ids: Tensor, seed: int, size: int) -> Tensor:
    """[n, 1, size, size]: the faces of identities ``ids``, a coarse 6 x 6 and a
    finer 12 x 12 random pattern upsampled and summed, standardized."""
    ids = ids[:, None]
    coarse = hash_normal(seed, _PROTOTYPE, ids, torch.arange(36, device=ids.device)).view(-1, 1, 6, 6)
    detail = hash_normal(seed, _DETAIL, ids, torch.arange(144, device=ids.device)).view(-1, 1, 12, 12)
    img = (F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
           + 0.5 * F.interpolate(detail, size=size, mode="bilinear", align_corners=False))
    return (img - img.mean((2, 3), keepdim=True)) / img.std((2, 3), keepdim=True).clamp_min(1e-6)


def augment(faces: Tensor, seed: int, stream: int, sample: Tensor) -> Tensor:
    """Each face as a photo of it: an affine jitter (shift up to 1/8 of the
    side, rotation up to 12 degrees, scale 0.85-1.15), contrast 0.6-1.4,
    brightness +-0.4, an occluding square (half of the samples) and noise."""
    n, _, size, _ = faces.shape
    dev = faces.device
    u = [hash_uniform(seed, _AUGMENT, stream, sample, k, device=dev) for k in range(8)]
    angle = (u[0] - 0.5) * (2 * math.radians(12))
    scale = 0.85 + 0.3 * u[1]
    shift = (torch.stack([u[2], u[3]], 1) - 0.5) * 0.5  # in [-1, 1] units: 1/8 of the side either way
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(faces.shape), align_corners=False)
    img = F.grid_sample(faces, grid, mode="bilinear", padding_mode="border", align_corners=False)
    img = img * (0.6 + 0.8 * u[4])[:, None, None, None] + ((u[5] - 0.5) * 0.8)[:, None, None, None]
    side = size // 3
    pos = torch.arange(size, device=dev)
    top, left = (u[6] * (size - side)).long(), (hash_uniform(seed, _AUGMENT, stream, sample, 8, device=dev)
                                                  * (size - side)).long()
    inside = (((pos[None, :] >= top[:, None]) & (pos[None, :] < top[:, None] + side))[:, :, None]
              & ((pos[None, :] >= left[:, None]) & (pos[None, :] < left[:, None] + side))[:, None, :])
    occluded = (u[7] < 0.5)[:, None, None] & inside
    img = torch.where(occluded[:, None], torch.zeros_like(img), img)
    pixels = torch.arange(size * size, device=dev)
    noise = hash_normal(seed, _NOISE, stream, sample[:, None], pixels, device=dev).view(n, 1, size, size)
    return img + 0.3 * noise


def rank_rows(total: int, world: int, rank: int) -> range:
    """This rank's contiguous rows of a global batch of ``total`` (any world size)."""
    start, count = class_split(total, world, rank)
    return range(start, start + count)


def train_batch(step: int, rows: range, cfg: "Config", device) -> tuple[Tensor, Tensor]:
    """Rows ``rows`` of the global batch of ``step``: identities drawn uniformly
    from the training ones, their samples drawn from (seed, step, row)."""
    j = torch.arange(rows.start, rows.stop, device=device)
    labels = (hash_uniform(cfg.seed, _LABEL, step, j, device=device) * cfg.identities).long()
    labels = labels.clamp_max(cfg.identities - 1)
    sample = step * cfg.batch + j  # a distinct sample for every (step, row)
    return augment(prototypes(labels, cfg.seed, cfg.image_size), cfg.seed, 0, sample), labels


def eval_images(cfg: "Config", device) -> tuple[Tensor, Tensor]:
    """The held-out identities [C, C + E), ``eval_samples`` photos each."""
    ids = torch.arange(cfg.identities, cfg.identities + cfg.eval_identities, device=device)
    ids = ids.repeat_interleave(cfg.eval_samples)
    sample = torch.arange(ids.numel(), device=device)
    return augment(prototypes(ids, cfg.seed, cfg.image_size), cfg.seed, _EVAL, sample), ids


# ---------------------------------------------------------------- backbone

class Block(nn.Module):
    """Two 3x3 convolutions with a shortcut, halving the side. GroupNorm
    normalizes each sample on its own: a row's embedding never depends on the
    other rows of its rank, so the loss is the same at every world size."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(8, cout)
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.GroupNorm(8, cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.skip(x))


class Backbone(nn.Module):
    """[N, 1, S, S] images -> [N, D] embeddings: a stem, three residual
    blocks (S -> S/8), then a linear layer to D, as face backbones end."""

    def __init__(self, embedding_size: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.GroupNorm(8, width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width, 2 * width), Block(2 * width, 4 * width), Block(4 * width, 4 * width))
        side = -(-image_size // 8)
        self.features = nn.Linear(4 * width * side * side, embedding_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(self.blocks(self.stem(x)).flatten(1))


# ---------------------------------------------------------------- verification

def pairs(labels: Tensor, seed: int, negatives: int) -> tuple[Tensor, Tensor, Tensor]:
    """(i, j, same): every pair of photos of one identity, and ``negatives``
    pairs of different identities drawn by the hash."""
    n = labels.numel()
    i, j = torch.triu_indices(n, n, offset=1, device=labels.device)
    same = labels[i] == labels[j]
    pi, pj = i[same], j[same]
    k = torch.arange(4 * negatives, device=labels.device)
    ni = (hash_uniform(seed, _PAIRS, 0, k, device=labels.device) * n).long().clamp_max(n - 1)
    nj = (hash_uniform(seed, _PAIRS, 1, k, device=labels.device) * n).long().clamp_max(n - 1)
    keep = (labels[ni] != labels[nj]).nonzero().squeeze(1)[:negatives]
    ni, nj = ni[keep], nj[keep]
    return torch.cat([pi, ni]), torch.cat([pj, nj]), torch.cat([torch.ones_like(pi, dtype=torch.bool),
                                                                torch.zeros_like(ni, dtype=torch.bool)])


FARS = (1e-3, 1e-2, 1e-1)


def verification(scores: Tensor, same: Tensor) -> dict:
    """1:1 verification from pair scores: the accuracy at the best threshold
    over genuine and impostor pairs weighted equally (as on LFW's balanced
    pairs: chance is 0.5), TAR at each FAR the impostors allow (at least 1/FAR
    of them), and ROC points."""
    scores, same = scores.double().cpu(), same.cpu()
    pos, neg = scores[same], scores[~same]
    order = torch.argsort(scores, descending=True)
    hits = same[order].double()
    tp = torch.cumsum(hits, 0)  # accepted genuine pairs at each threshold (accept the top k)
    fp = torch.cumsum(1 - hits, 0)
    balanced = 0.5 * (tp / max(pos.numel(), 1) + (neg.numel() - fp) / max(neg.numel(), 1))
    best = int(torch.argmax(balanced))
    out = {"accuracy": float(balanced[best]), "threshold": float(scores[order][best]),
           "pairs_genuine": pos.numel(), "pairs_impostor": neg.numel()}
    neg_sorted = torch.sort(neg, descending=True).values
    for far in FARS:
        allowed = int(far * neg.numel())
        if allowed >= 1:  # the threshold: the (allowed + 1)-th highest impostor score
            out[f"tar@far={far:g}"] = float((pos > neg_sorted[allowed]).double().mean())
    roc = []  # (FAR, TAR) at FARs spaced evenly on a log scale, down to one impostor
    for far in torch.logspace(math.log10(1 / max(neg.numel(), 1)), 0, 40).tolist():
        allowed = min(int(far * neg.numel()), neg.numel() - 1)
        roc.append([allowed / max(neg.numel(), 1), float((pos > neg_sorted[allowed]).double().mean())])
    out["roc"] = roc
    return out


@torch.no_grad()
def evaluate(model: nn.Module, cfg: "Config", device, amp: bool) -> dict:
    model.eval()
    images, labels = eval_images(cfg, device)
    embeddings = []
    for chunk in images.split(256):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            embeddings.append(model(chunk).float())
    model.train()
    e = F.normalize(torch.cat(embeddings), dim=1)
    i, j, same = pairs(labels, cfg.seed, cfg.eval_negatives)
    return verification((e[i] * e[j]).sum(1), same)


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


def margin_spec(name: str, args: dict) -> mk.Margin:
    """``--margin``: a family's short name (``margins.FAMILIES``), or softmax
    (normalized softmax, no margin) and elastic (ElasticArcFace)."""
    named = {spec.short_name: spec for spec in mk.margins.FAMILIES}
    named |= {"softmax": named["normsoftmax"], "elastic": named["elastic-arc"]}
    if name not in named:
        raise SystemExit(f"--margin must be one of {', '.join(sorted(named))}, got {name!r}")
    return named[name](**args)


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


# ---------------------------------------------------------------- checkpoints

def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(run: Run, root: str) -> str:
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


def load_checkpoint(run: Run, root: str) -> int | None:
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


# ---------------------------------------------------------------- output

class Progress:
    """A one-line progress bar on a terminal, a line per tenth of the run otherwise."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        bar = "#" * (30 * step // self.total)
        line = (f"[{bar:<30}] step {step}/{self.total}  loss {loss:7.3f}  lr {lr:.4f}  "
                f"{rate:5.1f} steps/s  eta {eta:4.0f} s")
        if self.tty:
            sys.stderr.write("\r" + line)
            if step == self.total:
                sys.stderr.write("\n")
        elif step == self.total or (step * 10) // self.total != ((step - 1) * 10) // self.total:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(("\n" if self.tty else "") + text + "\n")


def plot(runs: dict[str, dict], path: str) -> None:
    """Loss and verification against steps, one line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)", file=sys.stderr)
        return
    fig, (ax_loss, ax_acc, ax_roc) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, history in runs.items():
        ax_loss.plot(range(1, len(history["loss"]) + 1), history["loss"], label=name, linewidth=0.8)
        evals = history["evals"]
        if evals:
            steps = [e["step"] for e in evals]
            line, = ax_acc.plot(steps, [e["accuracy"] for e in evals], marker="o", label=f"{name}: accuracy")
            if "tar@far=0.001" in evals[-1]:
                ax_acc.plot(steps, [e.get("tar@far=0.001", float("nan")) for e in evals], marker="x",
                            linestyle="--", color=line.get_color(), label=f"{name}: TAR@FAR=1e-3")
            roc = evals[-1]["roc"]
            ax_roc.plot([p[0] for p in roc], [p[1] for p in roc], label=name)
    ax_loss.set(xlabel="step", ylabel="training loss", title="PartialFC loss (global batch)")
    ax_acc.set(xlabel="step", ylabel="held-out identities", title="1:1 verification", ylim=(0, 1.02))
    ax_roc.set(xscale="log", xlabel="FAR", ylabel="TAR", title="ROC at the end", xlim=(1e-4, 1), ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc, ax_roc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main

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


def config_from(args: argparse.Namespace, margin: str) -> Config:
    margin_args = {}
    for item in filter(None, args.margin_args.split(",")):
        key, _, value = item.partition("=")
        margin_args[key.strip()] = float(value) if value.strip().replace(".", "", 1).lstrip("-").isdigit() else value
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
            histories[margin] = train(config_from(args, margin), out, device, world, rank, resume=args.resume,
                                      stop_after=args.stop_after, quiet=args.quiet)
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
