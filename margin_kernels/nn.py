"""nn.Module heads that own the class weights and return the loss.

    head = margin_kernels.nn.ArcFace(512, 100_000)        # s=64, m=0.5
    loss = head(embeddings, labels)

Each named head takes (embedding_size, num_classes), then the parameters of
the margin spec of the same name in :mod:`margin_kernels.margins`, in its
order (``nn.ArcFace(512, C, 64.0, 0.5, easy_margin=True)``), then the head's
own keyword options; ``help(nn.ArcFace)`` lists them all. A head keeps the
margin's running state as buffers (``Margin.state_names``) and updates it in
training through the spec's step.
"""
from __future__ import annotations

import inspect
import typing

import torch
from torch import Tensor, nn

from . import margins as _margins
from .backends import KernelOptions
from .functional import kernel_options, margin_loss_step
from ._checks import check_args, check_subcenters
from ._state import check_loaded_layout, generators_kept_on_error, layout_state, state_dtype
from .margins import Margin, RowMargins

__all__ = [
    "MarginSoftmaxLoss",
    "NormSoftmax",
    "CosFace",
    "ArcFace",
    "SphereFace",
    "CombinedMargin",
    "ElasticArcFace",
    "ElasticCosFace",
    "AdaFace",
    "MagFace",
    "CurricularFace",
    "MVSoftmax",
]


class MarginSoftmaxLoss(nn.Module):
    """A class-weight matrix [num_classes, embedding_size] and a margin loss on it.

    Args:
        embedding_size: D.
        num_classes: C.
        margin: the margin spec.
        reduction, ignore_index, backend, workspace_bytes, options: as in ``margin_cross_entropy``.
        generator: source of elastic draws; ``last_margins`` keeps the last step's.
        device, dtype: of the weight (initialized N(0, 0.01) like insightface).
        subcenters: K sub-centers per class (sub-center ArcFace, Deng et al.
            2020; the paper uses 3): the weight is then [num_classes * K, D],
            class c's sub-centers at rows c * K ... c * K + K - 1, and a class's
            cosine is the max over them. Combines with every margin;
            ``margin_kernels.subcenters`` has the paper's clean-up step.
    """

    last_margins: RowMargins | None

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: Margin,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
        workspace_bytes: int | None = None,
        options: KernelOptions | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        subcenters: int = 1,
    ) -> None:
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"embedding_size and num_classes must be >= 1, got {embedding_size} and {num_classes}")
        check_subcenters(subcenters)
        self.margin = margin
        self.subcenters = subcenters
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend
        self.options = kernel_options(options, workspace_bytes)
        self.generator = generator
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, embedding_size, device=device, dtype=dtype))
        self.last_margins = None
        self.reset_parameters()
        # the margin's running state, beside the weight (no host sync per step)
        for name, value in margin.initial_state(device=self.weight.device, dtype=state_dtype(self.weight.dtype)).items():
            self.register_buffer(name, value)
        self.register_load_state_dict_pre_hook(_check_loaded_layout)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.01)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss of a batch. In training, the margin's state is first
        updated with the batch (its step); in eval mode it stays as it is. A
        call that raises changes nothing: the generator, ``last_margins`` and
        the margin's state stay as they were."""
        check_args(embeddings, self.weight, labels, self.margin, self.reduction)
        state = {name: getattr(self, name) for name in self.margin.state_names} or None
        with generators_kept_on_error(self.generator):
            loss, _, step = margin_loss_step(
                embeddings, self.weight, labels, self.margin, reduction=self.reduction,
                ignore_index=self.ignore_index, backend=self.backend, generator=self.generator, options=self.options,
                state=state, subcenters=self.subcenters, update=self.training, own_step=True,
            )
        if self.training:  # the batch's state, kept now that its loss exists
            with torch.no_grad():
                for name, value in step.state.items():
                    getattr(self, name).copy_(value)
        self.last_margins = step.margins
        return loss

    def get_extra_state(self) -> dict:
        """The layout a state_dict must match: sub-centers, margin family, its state."""
        return layout_state(self.subcenters, self.margin, [name for name, _ in self.named_buffers(recurse=False)])

    def set_extra_state(self, state: dict) -> None:
        pass  # checked by _check_loaded_layout before anything was copied

    def extra_repr(self) -> str:
        c, d = self.weight.shape
        sub = f", subcenters={self.subcenters}" if self.subcenters > 1 else ""
        return (f"embedding_size={d}, num_classes={c // self.subcenters}{sub}, margin={self.margin}, "
                f"backend={self.backend!r}")


def _check_loaded_layout(module: MarginSoftmaxLoss, state_dict, prefix, *args) -> None:
    check_loaded_layout("head", module.get_extra_state(), state_dict, prefix)


# The heads' own options, after the margin's parameters (keyword-only).
_HEAD_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
    for name, default, annotation in [
        ("reduction", "mean", str),
        ("ignore_index", -100, int),
        ("backend", "auto", str),
        ("workspace_bytes", None, typing.Optional[int]),
        ("options", None, typing.Optional[KernelOptions]),
        ("generator", None, typing.Optional[torch.Generator]),
        ("device", None, typing.Union[torch.device, str, None]),
        ("dtype", None, typing.Optional[torch.dtype]),
        ("subcenters", 1, int),
    ]
]


def _named_head(spec: type[Margin]) -> type[MarginSoftmaxLoss]:
    """The head of one margin family, its signature spelled out from the spec's
    own (so ``help()`` and ``inspect.signature`` show every parameter)."""
    hints = typing.get_type_hints(spec)
    margin_params = [p.replace(annotation=hints.get(p.name, p.annotation))
                     for p in inspect.signature(spec).parameters.values()]
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature(
        [inspect.Parameter("self", positional), inspect.Parameter("embedding_size", positional, annotation=int),
         inspect.Parameter("num_classes", positional, annotation=int)] + margin_params + _HEAD_OPTIONS,
        return_annotation=None,
    )
    margin_names = [p.name for p in margin_params]

    def __init__(self, embedding_size: int, num_classes: int, *args, **kwargs) -> None:
        bound = signature.bind(self, embedding_size, num_classes, *args, **kwargs).arguments
        margin = spec(**{k: bound[k] for k in margin_names if k in bound})
        head_options = {p.name: bound[p.name] for p in _HEAD_OPTIONS if p.name in bound}
        MarginSoftmaxLoss.__init__(self, embedding_size, num_classes, margin, **head_options)

    __init__.__signature__ = signature
    __init__.__annotations__ = {p.name: p.annotation for p in signature.parameters.values() if p.name != "self"}
    state = (f" Its running state ({', '.join(spec.state_names)}) is kept as buffers, in ``state_dict``."
             if spec.state_names else "")
    doc = (f"{spec.__name__} head: ``{spec.__name__}(embedding_size, num_classes, <margin parameters>, "
           f"*, <head options>)``, a class-weight matrix and the loss of :class:`margin_kernels.margins."
           f"{spec.__name__}` on it (options as in :class:`MarginSoftmaxLoss`).{state}\n\n    {spec.__doc__}")
    return type(spec.__name__, (MarginSoftmaxLoss,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


NormSoftmax = _named_head(_margins.NormSoftmax)
CosFace = _named_head(_margins.CosFace)
ArcFace = _named_head(_margins.ArcFace)
SphereFace = _named_head(_margins.SphereFace)
CombinedMargin = _named_head(_margins.CombinedMargin)
ElasticArcFace = _named_head(_margins.ElasticArcFace)
ElasticCosFace = _named_head(_margins.ElasticCosFace)
AdaFace = _named_head(_margins.AdaFace)
MagFace = _named_head(_margins.MagFace)
CurricularFace = _named_head(_margins.CurricularFace)
MVSoftmax = _named_head(_margins.MVSoftmax)
