"""Sharded PartialFC checkpoints are atomic and self-describing: a load reads
exactly the files of one save, verified, and every damaged file is an error
that names it."""
import os
import threading

import pytest
import torch

import margin_kernels as mk

from _dist import run_ranks
from conftest import requires_cpp

pytestmark = requires_cpp

D, C = 6, 25
MARGIN = mk.ArcFace()


def filled(value: float) -> mk.PartialFC:
    pfc = mk.PartialFC(D, C, MARGIN)
    with torch.no_grad():
        pfc.weight.fill_(value)
    return pfc


def _save_world2(rank, world, path, value):
    filled(value + rank).save_sharded(path)  # rank r's classes hold value + r
    return None


@pytest.mark.slow
def test_a_save_over_another_world_size_is_never_mixed_in(tmp_path):
    """Saving at world size 1 into a directory that holds a world-2 save used to
    leave the old shard files, and the loader copied rows from them."""
    path = str(tmp_path / "ck")
    run_ranks(_save_world2, 2, path, 10.0, outdir=str(tmp_path))
    assert len([f for f in os.listdir(path) if f.startswith("classes_")]) == 2
    filled(1.0).save_sharded(path)
    assert len([f for f in os.listdir(path) if f.startswith("classes_")]) == 1  # the old save's files are gone
    loaded = filled(0.0)
    loaded.load_sharded(path)
    assert torch.all(loaded.weight == 1.0)


def _save_loop(rank, world, path, rounds):
    pfc = mk.PartialFC(D, C, MARGIN)
    for i in range(rounds):
        with torch.no_grad():
            pfc.weight.fill_(float(i % 2))  # whole saves alternate between all-0 and all-1
        pfc.save_sharded(path)
    return None


@pytest.mark.slow
def test_a_reader_racing_saves_sees_one_whole_save(tmp_path):
    """Two ranks save alternately all-0 and all-1 weights while this process
    loads: every load is all 0 or all 1, never rows of both (1 load in 19 mixed
    two rounds before saves named their files)."""
    path = str(tmp_path / "ck")
    filled(0.0).save_sharded(path)
    done, loads, errors = threading.Event(), [], []

    def reader():
        pfc = filled(5.0)
        while not done.is_set():
            try:
                pfc.load_sharded(path)
            except ValueError as exc:
                errors.append(str(exc))
                continue
            values = pfc.weight.unique().tolist()
            loads.append(values)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        run_ranks(_save_loop, 2, path, 40, outdir=str(tmp_path))
    finally:
        done.set()
        thread.join()
    assert loads and all(v in ([0.0], [1.0]) for v in loads), [v for v in loads if v not in ([0.0], [1.0])][:3]
    assert not errors, errors[:3]  # a load racing a save starts over from the new one (10 of 21 raised)


def _damage_truncate(file):
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])


def _damage_empty(file):
    open(file, "wb").close()


def _damage_garbage(file):
    size = os.path.getsize(file)
    open(file, "wb").write(os.urandom(size))


def _damage_flip(file):
    data = bytearray(open(file, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(file, "wb").write(bytes(data))


@pytest.mark.parametrize("damage, match", [
    (_damage_truncate, r"bytes, but meta.pt records \d+ \(truncated or replaced\)"),
    (_damage_empty, r"0 bytes, but meta.pt records"),
    (_damage_garbage, r"sha256 does not match"),
    (_damage_flip, r"sha256 does not match"),
])
def test_a_damaged_shard_is_named_and_the_weight_kept(tmp_path, damage, match):
    """A truncated shard raised 'OSError: [Errno 22] Invalid argument' with no
    file name; garbage, a message about mmap; flipped bytes loaded silently."""
    path = str(tmp_path / "ck")
    filled(1.0).save_sharded(path)
    (shard,) = [f for f in os.listdir(path) if f.startswith("classes_")]
    damage(os.path.join(path, shard))
    pfc = filled(7.0)
    with pytest.raises(ValueError, match=match) as info:
        pfc.load_sharded(path)
    assert shard in str(info.value)
    assert torch.all(pfc.weight == 7.0)  # nothing half-loaded


def test_a_damaged_meta_is_named(tmp_path):
    path = str(tmp_path / "ck")
    filled(1.0).save_sharded(path)
    _damage_truncate(os.path.join(path, "meta.pt"))
    with pytest.raises(ValueError, match=r"meta.pt: unreadable"):
        filled(0.0).load_sharded(path)


def test_meta_lists_exactly_the_files_of_the_save(tmp_path):
    path = str(tmp_path / "ck")
    filled(1.0).save_sharded(path)
    meta = torch.load(os.path.join(path, "meta.pt"), weights_only=True)
    (entry,) = meta["shards"]
    assert set(entry) == {"file", "start", "end", "bytes", "sha256"}
    assert (entry["start"], entry["end"]) == (0, C) and meta["save_id"] in entry["file"]
    assert os.path.getsize(os.path.join(path, entry["file"])) == entry["bytes"]
    assert sorted(os.listdir(path)) == sorted(["meta.pt", entry["file"]])  # no temporary files left
