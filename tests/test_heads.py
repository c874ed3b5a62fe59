"""The heads: one per margin family, built from one place, every parameter
in its signature (help() and editors' call tips show them)."""
import dataclasses
import inspect
import pydoc

import pytest
import torch

import margin_kernels as mk
from margin_kernels.margins import FAMILIES

HEAD_OPTIONS = ["reduction", "ignore_index", "backend", "workspace_bytes", "options", "generator", "device", "dtype",
                "subcenters"]


@pytest.mark.parametrize("spec", FAMILIES, ids=[s.__name__ for s in FAMILIES])
def test_every_parameter_is_in_the_signature(spec):
    head = getattr(mk.nn, spec.__name__)
    params = inspect.signature(head).parameters
    fields = [f.name for f in dataclasses.fields(spec) if f.name != "_"]
    assert list(params)[:2] == ["embedding_size", "num_classes"]
    assert set(fields) | set(HEAD_OPTIONS) <= set(params)
    for f in dataclasses.fields(spec):
        if f.name != "_":
            assert params[f.name].default == f.default, f.name
            assert params[f.name].annotation is not str  # resolved types, not strings
    assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in HEAD_OPTIONS)
    text = pydoc.render_doc(head)
    assert "subcenters" in text and "backend" in text and fields[0] in text


def test_arguments_reach_the_spec_and_the_head():
    head = mk.nn.ArcFace(8, 5, 32.0, 0.3, easy_margin=True, subcenters=2, reduction="sum", dtype=torch.float64)
    assert head.margin == mk.ArcFace(32.0, 0.3, easy_margin=True)
    assert head.weight.shape == (10, 8) and head.weight.dtype == torch.float64 and head.reduction == "sum"
    with pytest.raises(TypeError, match="unexpected keyword argument 'margin'"):
        mk.nn.ArcFace(8, 5, margin=0.3)
    with pytest.raises(TypeError):
        mk.nn.ArcFace(8, 5, 64.0, 0.5, "extra")


@pytest.mark.parametrize("spec", FAMILIES, ids=[s.__name__ for s in FAMILIES])
def test_the_margins_state_is_the_heads_buffers(spec):
    head = getattr(mk.nn, spec.__name__)(8, 5)
    assert [name for name, _ in head.named_buffers()] == list(spec.state_names)
    for name, value in spec().initial_state().items():
        assert torch.equal(getattr(head, name), value)
