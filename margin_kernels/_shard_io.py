"""PartialFC checkpoints whose cost scales with a shard, not with the class count.

Two forms, both loadable at any world size:

* the full [C, D] matrix (``state_dict()``), assembled in host memory one shard
  at a time, so a device never holds more than one extra shard;
* a sharded directory (``save_sharded``), one file per saving rank, where a
  loading rank memory-maps only the files that overlap its own class block and
  copies the overlap. Nothing ever holds the whole matrix. The weight's
  optimizer state (momentum, Adam moments) is resharded the same way.

Directory layout::

    meta.pt                                    written last: the save's id and the exact list of its
                                               files, with their class ranges, sizes and sha256; the
                                               module's buffers (a margin's state, equal on every rank)
    classes_<start>_<end>.<save id>.pt         {"start", "end", "weight", "optimizer"}

A save is atomic for readers: every rank writes its shard under a name unique
to this save, then rank 0 replaces ``meta.pt``, then the files of earlier saves
are removed. A loader reads only the files ``meta.pt`` names and checks each
one's size and checksum first, so stale shards of an earlier save (another world
size) are never mixed in, and a truncated, replaced or damaged file is an error
that names it. A reader racing a save reads the old save or the new one; when
the old files vanish under it, it starts over from the new ``meta.pt``.
"""
from __future__ import annotations

import hashlib
import io
import os
import secrets
from typing import Any

import torch
from torch import Tensor

from ._sharding import Shard, class_split
from ._state import check_layout

FORMAT = 2
META = "meta.pt"
LOAD_ATTEMPTS = 20  # a save racing the load: start over from the new meta.pt up to this many times


def _shard_name(start: int, end: int, save_id: str) -> str:
    return f"classes_{start:012d}_{end:012d}.{save_id}.pt"


def _atomic_write(data: bytes, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------- full matrix


def gather_full(shard: Shard, dst: int | None = None) -> Tensor | None:
    """The full [C, D] class matrix in host memory, on every rank (``dst=None``)
    or on rank ``dst`` only (None elsewhere). A collective.

    Shards travel one at a time through a buffer of one shard on the weight's
    device; a [C, D] gather on the device would not fit at the sizes PartialFC is for.
    """
    group, weight, k = shard.group, shard.weight.detach(), shard.subcenters
    splits = [class_split(shard.num_classes, group.size, r) for r in range(group.size)]
    splits = [(start * k, count * k) for start, count in splits]  # in weight rows
    wanted = dst is None or group.rank == dst
    full = torch.empty((shard.num_classes * k, shard.embedding_size), dtype=weight.dtype) if wanted else None
    buffer = torch.empty((max(n for _, n in splits), shard.embedding_size), dtype=weight.dtype, device=weight.device)
    for r, (start, count) in enumerate(splits):
        part = buffer[:count]
        if r == group.rank:
            part.copy_(weight)
        if dst is None:
            group.broadcast(part, src_rank=r)
        elif r != dst:  # point to point: only dst needs the rows
            if group.rank == r:
                group.send(part, dst)
            elif group.rank == dst:
                group.recv(part, r)
        if full is not None:
            full[start : start + count].copy_(part)
    return full


# ---------------------------------------------------------------------- sharded directory


def _check_holds_weight(shard: Shard, optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is not None and not any(p is shard.weight for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("optimizer does not hold this PartialFC's weight in its param_groups")


def save_sharded(shard: Shard, path: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write this rank's shard (and its optimizer state) under directory ``path``.

    A collective: every rank calls it with the same ``path`` on a file system
    they share. Returns once ``meta.pt`` names every rank's file.
    """
    _check_holds_weight(shard, optimizer)
    group = shard.group
    os.makedirs(path, exist_ok=True)
    save_id = group.all_gather_object(secrets.token_hex(8) if group.rank == 0 else None)[0]
    start, end = shard.class_start, shard.class_start + shard.num_local
    shard_state = None
    if optimizer is not None:
        # Per-class tensors (momentum, moments) are this shard's rows, like the
        # weight; the rest (Adam's step) is the same on every rank.
        shard_state = {key: value.detach().cpu() if isinstance(value, Tensor) else value
                       for key, value in optimizer.state.get(shard.weight, {}).items()}
    data = _serialize({"start": start, "end": end, "weight": shard.weight.detach().cpu(), "optimizer": shard_state})
    name = _shard_name(start, end, save_id)
    _atomic_write(data, os.path.join(path, name))
    entry = {"file": name, "start": start, "end": end, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    shards = group.all_gather_object(entry)  # also: every rank's file is complete
    if group.rank == 0:
        meta = {"format": FORMAT, "save_id": save_id, "num_classes": shard.num_classes, "subcenters": shard.subcenters,
                "embedding_size": shard.embedding_size, "dtype": str(shard.weight.dtype), "world_size": group.size,
                "shards": shards, "buffers": {name: buf.detach().cpu() for name, buf in shard.buffers.items()},
                "layout": shard.layout}
        _atomic_write(_serialize(meta), os.path.join(path, META))
        keep = {entry["file"] for entry in shards}
        for old in os.listdir(path):  # earlier saves' shards, now unreachable
            if old.startswith("classes_") and old.endswith(".pt") and old not in keep:
                try:
                    os.remove(os.path.join(path, old))
                except FileNotFoundError:
                    pass
    group.barrier()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


# Every key a meta.pt holds, and what each shard entry holds.
META_KEYS = {"format": int, "save_id": str, "num_classes": int, "subcenters": int, "embedding_size": int,
             "dtype": str, "world_size": int, "shards": list, "buffers": dict}
SHARD_KEYS = {"file": str, "start": int, "end": int, "bytes": int, "sha256": str}


def _read_meta(path: str) -> dict:
    """meta.pt, checked to be a whole record of this format: anything else is
    a ValueError naming the file."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise ValueError(f"path {path!r} is not a sharded PartialFC checkpoint (no {META})")
    try:
        meta = torch.load(meta_path, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{meta_path}: unreadable ({_first_line(exc)})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path}: checkpoint format {found!r}, this version reads {FORMAT} "
                         "(re-save it with the version that wrote it)")
    _check_fields(meta, META_KEYS, meta_path)
    for i, entry in enumerate(meta["shards"]):
        _check_fields(entry, SHARD_KEYS, f"{meta_path} (shard entry {i})")
    return meta


def _check_fields(record: object, fields: dict, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a dict, got {type(record).__name__} (a malformed checkpoint)")
    for key, kind in fields.items():
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise ValueError(f"{where}: {key!r} is missing or not a {kind.__name__} (a malformed checkpoint)")


def _load_shard(path: str, entry: dict) -> dict:
    """One shard file named by meta.pt, after checking its size and checksum."""
    file = os.path.join(path, entry["file"])
    size = os.path.getsize(file)  # FileNotFoundError: a save replaced this one (the caller retries)
    if size != entry["bytes"]:
        raise ValueError(f"{file}: {size} bytes, but {META} records {entry['bytes']} (truncated or replaced)")
    if _sha256(file) != entry["sha256"]:
        raise ValueError(f"{file}: sha256 does not match the one {META} records (the file is damaged)")
    try:
        shard = torch.load(file, mmap=True, weights_only=True)
    except Exception as exc:
        if not os.path.exists(file):  # a save replaced this one between the checks and the read (the caller retries)
            raise FileNotFoundError(file) from exc
        raise ValueError(f"{file}: unreadable ({_first_line(exc)})") from exc
    if not isinstance(shard, dict) or not isinstance(shard.get("weight"), Tensor):
        raise ValueError(f"{file}: not a shard of this format (no weight tensor)")
    if (shard.get("start"), shard.get("end")) != (entry["start"], entry["end"]):
        raise ValueError(f"{file}: holds classes [{shard.get('start')}, {shard.get('end')}), {META} says "
                         f"[{entry['start']}, {entry['end']})")
    return shard


def load_sharded(shard: Shard, path: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Fill this rank's shard (and its optimizer state) from a directory written
    by ``save_sharded`` at any world size. Reads only the files meta.pt names
    that overlap this rank's classes, verified and memory-mapped. Not a collective.

    Everything is checked and staged before the first byte is copied in: a load
    that raises leaves the weight, the buffers and the optimizer state as they
    were. A save that replaces the files while this reads them sends it back to
    the new meta.pt, up to LOAD_ATTEMPTS times."""
    _check_holds_weight(shard, optimizer)
    for _ in range(LOAD_ATTEMPTS):
        meta = _read_meta(path)
        try:
            staged = _stage(shard, path, meta, optimizer)
        except FileNotFoundError:
            if _read_meta(path)["save_id"] == meta["save_id"]:  # no newer save: the files are really gone
                missing = [e["file"] for e in meta["shards"] if not os.path.exists(os.path.join(path, e["file"]))]
                raise ValueError(f"{path}: {META} lists files that are missing: {missing}") from None
            continue  # a newer save replaced this one while we read it: start over from it
        _commit(shard, optimizer, *staged)
        return
    raise ValueError(f"{path}: a save replaced the checkpoint's files {LOAD_ATTEMPTS} times while they were read; "
                     "load once the saves pause")


def _stage(shard: Shard, path: str, meta: dict,
           optimizer: torch.optim.Optimizer | None) -> tuple[Tensor, dict[str, Tensor], dict[str, Any] | None]:
    """(this rank's weight rows, the buffers, the optimizer state), read from the
    checkpoint and checked against the module, in host memory; nothing of
    ``shard`` is touched."""
    meta_path = os.path.join(path, META)
    expected = (shard.num_classes, shard.embedding_size)
    if (meta["num_classes"], meta["embedding_size"]) != expected:
        raise ValueError(f"{path}: checkpoint holds [{meta['num_classes']}, {meta['embedding_size']}] classes x dims, "
                         f"this PartialFC is {list(expected)}")
    k = shard.subcenters
    if meta["subcenters"] != k:
        raise ValueError(f"{path}: checkpoint has {meta['subcenters']} sub-center(s) per class, this "
                         f"PartialFC {k}")
    weight = shard.weight.detach()
    if meta["dtype"] != str(weight.dtype):
        raise ValueError(f"{path}: checkpoint holds {meta['dtype']} weights, this PartialFC {weight.dtype} (build it "
                         f"with dtype={meta['dtype']}, load, then cast)")
    mine = shard.layout
    # (saves before the layout record: the margin is unknown, its state's names tell)
    saved_layout = meta.get("layout", {"subcenters": meta["subcenters"], "margin": mine["margin"],
                                       "state": sorted(meta["buffers"])})
    check_layout("PartialFC", mine, saved_layout, meta_path)
    buffers = {}
    for name, buf in shard.buffers.items():
        saved = meta["buffers"].get(name)
        if not isinstance(saved, Tensor) or saved.shape != buf.shape:
            raise ValueError(f"{meta_path}: holds no {name!r} of shape {tuple(buf.shape)} (got {saved!r})")
        buffers[name] = saved

    lo, hi = shard.class_start, shard.class_start + shard.num_local
    covered = lo
    new_weight = torch.empty(weight.shape, dtype=weight.dtype)
    new_state: dict[str, Any] | None = None if optimizer is None else {}
    for entry in sorted(meta["shards"], key=lambda e: e["start"]):
        start, end = entry["start"], entry["end"]
        if end <= lo or start >= hi:
            continue
        if start > covered:
            break
        part = _load_shard(path, entry)
        a, b = max(start, lo), min(end, hi)
        new_weight[(a - lo) * k : (b - lo) * k].copy_(part["weight"][(a - start) * k : (b - start) * k])
        if new_state is not None:
            saved = part.get("optimizer")
            if saved is None:
                raise ValueError(f"{os.path.join(path, entry['file'])}: saved without optimizer state, but an "
                                 "optimizer was given")
            for key, value in saved.items():
                if isinstance(value, Tensor) and value.shape == part["weight"].shape:
                    if key not in new_state:
                        new_state[key] = torch.empty((shard.num_local * k,) + value.shape[1:], dtype=value.dtype)
                    new_state[key][(a - lo) * k : (b - lo) * k].copy_(value[(a - start) * k : (b - start) * k])
                elif key not in new_state:
                    new_state[key] = value.clone() if isinstance(value, Tensor) else value
        covered = max(covered, b)
    if covered < hi:
        raise ValueError(f"{path}: no shard file holds classes [{covered}, {hi}) (a missing or partial checkpoint)")
    return new_weight, buffers, new_state


def _commit(shard: Shard, optimizer: torch.optim.Optimizer | None, weight: Tensor, buffers: dict[str, Tensor],
            state: dict[str, Any] | None) -> None:
    """Copy a staged load in; nothing here can fail on the checkpoint's account."""
    with torch.no_grad():
        shard.weight.copy_(weight)
        for name, buf in shard.buffers.items():
            buf.copy_(buffers[name])
    if optimizer is not None:
        device = shard.weight.device
        optimizer.state[shard.weight] = {key: value.to(device) if isinstance(value, Tensor) and value.dim() else value
                                       for key, value in state.items()}
