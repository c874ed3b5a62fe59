"""A step that raises changes nothing: the pieces of state a step draws from
(generators) are given back their state, and what it updates (running
statistics) is committed by the caller only once the loss is computed."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def generators_kept_on_error(*generators: torch.Generator | None) -> Iterator[None]:
    """Restore every given generator's state if the block raises, so that a
    failed step has drawn nothing (the next good step draws what it would
    have). Free under torch.compile, where the state is not read."""
    kept = [] if torch.compiler.is_compiling() else [(g, g.get_state()) for g in generators if g is not None]
    try:
        yield
    except BaseException:
        for generator, state in kept:
            generator.set_state(state)
        raise


def state_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of a margin's running state for weights of ``dtype``: float64
    for float64 (the oracle computes everything in float64), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


EXTRA_STATE = "_extra_state"


def layout_state(subcenters: int, margin: object, buffers: list[str]) -> dict:
    """What a state_dict must agree on beyond tensor shapes: sub-centers per
    class (K = 3 and C = 20 has the rows of K = 2 and C = 30), the margin family
    and the names of the running state it keeps (``Margin.state_names``)."""
    return {"subcenters": subcenters, "margin": type(margin).__name__, "state": sorted(buffers)}


def check_layout(what: str, mine: dict, saved: object, where: str) -> None:
    """Refuse a saved layout record (``layout_state``) that is not this
    module's: another K, or another margin family where either keeps state.
    ``where`` names the record in the message."""
    if not isinstance(saved, dict) or not {"subcenters", "margin", "state"} <= saved.keys():
        raise ValueError(f"{where} must be this library's layout record, got {saved!r}")
    if saved["subcenters"] != mine["subcenters"]:
        raise ValueError(f"{where}: saved with {saved['subcenters']} sub-centers per class, this {what} has "
                         f"{mine['subcenters']} (the weight's rows would be regrouped into other classes)")
    if (saved["state"] or mine["state"]) and (saved["margin"], list(saved["state"])) != (mine["margin"], mine["state"]):
        raise ValueError(f"{where}: saved by a {what} with {saved['margin']} (state: {list(saved['state']) or 'none'}), "
                         f"this {what} has {mine['margin']} (state: {mine['state'] or 'none'})")


def check_loaded_layout(what: str, mine: dict, state_dict: dict, prefix: str) -> None:
    """load_state_dict pre-hook body: refuse a state_dict of another layout
    before anything is copied (torch reports strict-mode mismatches only after
    copying what matched). A state_dict without the record (written before it
    existed) is taken as this module's layout."""
    key = prefix + EXTRA_STATE
    if key not in state_dict:
        state_dict[key] = dict(mine)
        return
    check_layout(what, mine, state_dict[key], f"state_dict[{key!r}]")
