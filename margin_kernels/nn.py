"""nn.Module heads that own the class weights and return the loss.

    head = margin_kernels.nn.ArcFace(512, 100_000)        # s=64, m=0.5
    loss = head(embeddings, labels)

Each named head forwards its positional and keyword margin arguments to the spec
of the same name in :mod:`margin_kernels.margins` (``nn.ArcFace(512, C, 64.0, 0.5,
easy_margin=True)``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import margins as _margins
from .backends import KernelOptions
from .functional import draw_margins, kernel_options, margin_cross_entropy, target_cosines
from ._checks import check_args, check_subcenters, check_values
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
        self.register_load_state_dict_pre_hook(_check_loaded_layout)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.01)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss of a batch. A call that raises changes nothing: the
        generator, ``last_margins`` and the margin's state stay as they were."""
        check_args(embeddings, self.weight, labels, self.margin, self.reduction)
        with generators_kept_on_error(self.generator):
            row_margins = draw_margins(
                embeddings, self.weight, labels, self.margin, ignore_index=self.ignore_index,
                generator=self.generator, subcenters=self.subcenters,
            )
            loss = self._loss(embeddings, labels, row_margins)
        self.last_margins = row_margins
        return loss

    def _loss(self, embeddings: Tensor, labels: Tensor, row_margins: RowMargins | None, **kwargs) -> Tensor:
        return margin_cross_entropy(
            embeddings, self.weight, labels, self.margin, reduction=self.reduction, ignore_index=self.ignore_index,
            backend=self.backend, options=self.options, margins=row_margins, subcenters=self.subcenters, **kwargs,
        )

    def _state_dtype(self) -> torch.dtype:
        return state_dtype(self.weight.dtype)

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


def _named_head(spec: type[Margin]) -> type[MarginSoftmaxLoss]:
    loss_kwargs = ("reduction", "ignore_index", "backend", "workspace_bytes", "options", "generator", "device", "dtype",
                   "subcenters")

    def __init__(self, embedding_size: int, num_classes: int, *margin_args, **kwargs) -> None:
        head_kwargs = {k: kwargs.pop(k) for k in loss_kwargs if k in kwargs}
        MarginSoftmaxLoss.__init__(self, embedding_size, num_classes, spec(*margin_args, **kwargs), **head_kwargs)

    doc = f"{spec.__name__} head: ``{spec.__name__}(embedding_size, num_classes, *margin_args, **kwargs)``.\n\n"
    doc += f"Margin arguments go to :class:`margin_kernels.margins.{spec.__name__}`:\n\n    {spec.__doc__}"
    return type(spec.__name__, (MarginSoftmaxLoss,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


NormSoftmax = _named_head(_margins.NormSoftmax)
CosFace = _named_head(_margins.CosFace)
ArcFace = _named_head(_margins.ArcFace)
SphereFace = _named_head(_margins.SphereFace)
CombinedMargin = _named_head(_margins.CombinedMargin)
ElasticArcFace = _named_head(_margins.ElasticArcFace)
ElasticCosFace = _named_head(_margins.ElasticCosFace)


class AdaFace(MarginSoftmaxLoss):
    """AdaFace head: ``AdaFace(embedding_size, num_classes, m=0.4, h=0.333, s=64.0,
    momentum=0.01, **kwargs)``.

    Keeps the running mean and std of the clipped embedding norms as buffers
    (``batch_mean``, ``batch_std``, in ``state_dict``; starting at 20 and 100 as
    the official head does). In training, each forward first updates them with
    the batch's valid rows, then computes the rows' margins from them
    (:class:`margin_kernels.margins.AdaFace`); in eval mode they stay as they
    are. ``last_margins`` keeps the step's margins, to replay it.
    """

    batch_mean: Tensor
    batch_std: Tensor

    def __init__(self, embedding_size: int, num_classes: int, m: float = 0.4, h: float = 0.333, s: float = 64.0,
                 momentum: float = 0.01, **kwargs) -> None:
        margin_kwargs = {k: kwargs.pop(k) for k in ("overflow", "easy_margin", "detach_margin", "allow_any_margin")
                         if k in kwargs}
        spec = _margins.AdaFace(s, m, h, momentum, **margin_kwargs)
        super().__init__(embedding_size, num_classes, spec, **kwargs)
        factory = dict(device=self.weight.device, dtype=self._state_dtype())
        self.register_buffer("batch_mean", torch.tensor(spec.INITIAL_MEAN, **factory))
        self.register_buffer("batch_std", torch.tensor(spec.INITIAL_STD, **factory))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_args(embeddings, self.weight, labels, self.margin, self.reduction)
        spec: _margins.AdaFace = self.margin
        norms = spec.clipped_norms(embeddings)
        mean, std = self.batch_mean, self.batch_std
        if self.training:  # the batch's statistics, kept only once its loss is computed
            with torch.no_grad():
                mean, std = spec.updated_statistics(mean, std, norms, labels != self.ignore_index)
        row_margins = spec.margins_from_norms(norms, mean, std)
        loss = self._loss(embeddings, labels, row_margins)
        if self.training:
            with torch.no_grad():
                self.batch_mean.copy_(mean)
                self.batch_std.copy_(std)
        self.last_margins = row_margins
        return loss


class MagFace(MarginSoftmaxLoss):
    """MagFace head: ``MagFace(embedding_size, num_classes, l_a=10, u_a=110,
    l_m=0.45, u_m=0.8, lambda_g=35, s=64.0, easy_margin=True, **kwargs)``.

    The loss is the margin loss with per-row margins m(a) plus lambda_g g(a)
    (:class:`margin_kernels.margins.MagFace`), reduced over the valid rows like
    the loss; both terms pass their gradient through a = clamp(||x||, l_a, u_a)
    to the embeddings. Takes raw (unnormalized) embeddings: their norm is the
    feature magnitude.
    """

    def __init__(self, embedding_size: int, num_classes: int, l_a: float = 10.0, u_a: float = 110.0,
                 l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0, s: float = 64.0, **kwargs) -> None:
        margin_kwargs = {k: kwargs.pop(k) for k in ("overflow", "easy_margin", "detach_margin", "allow_any_margin")
                         if k in kwargs}
        spec = _margins.MagFace(s, l_a, u_a, l_m, u_m, lambda_g, **margin_kwargs)
        super().__init__(embedding_size, num_classes, spec, **kwargs)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_args(embeddings, self.weight, labels, self.margin, self.reduction)
        spec: _margins.MagFace = self.margin
        a = spec.magnitudes(embeddings)
        row_margins = spec.margins_from_magnitudes(a)
        loss = self._loss(embeddings, labels, row_margins)
        self.last_margins = row_margins
        valid = labels != self.ignore_index
        reg = torch.where(valid, spec.regularizer(a), torch.zeros_like(a))
        if self.reduction == "none":
            return loss + reg.to(loss.dtype)
        total = reg.sum()
        if self.reduction == "mean":
            total = total / valid.sum().clamp_min(1)
        return loss + total.to(loss.dtype)


class CurricularFace(MarginSoftmaxLoss):
    """CurricularFace head: ``CurricularFace(embedding_size, num_classes, m=0.5,
    s=64.0, momentum=0.01, **kwargs)``.

    Keeps the running t (the EMA of the target cosines, starting at 0) as the
    buffer ``t`` (in ``state_dict``). In training, each forward first updates it
    with the batch's valid rows, then modulates the hard negatives with it
    (:class:`margin_kernels.margins.CurricularFace`); in eval mode it stays as
    it is. A call that raises leaves it untouched.
    """

    t: Tensor

    def __init__(self, embedding_size: int, num_classes: int, m: float = 0.5, s: float = 64.0,
                 momentum: float = 0.01, **kwargs) -> None:
        margin_kwargs = {k: kwargs.pop(k) for k in ("overflow", "easy_margin", "detach_margin", "allow_any_margin")
                         if k in kwargs}
        spec = _margins.CurricularFace(s, m, momentum, **margin_kwargs)
        super().__init__(embedding_size, num_classes, spec, **kwargs)
        self.register_buffer("t", torch.tensor(spec.INITIAL_T, device=self.weight.device, dtype=self._state_dtype()))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_args(embeddings, self.weight, labels, self.margin, self.reduction)
        spec: _margins.CurricularFace = self.margin
        t = self.t
        if self.training:  # the batch's t, kept only once its loss is computed
            cos_y = target_cosines(embeddings, self.weight, labels, self.ignore_index, self.subcenters)
            t = spec.updated_t(self.t, cos_y, labels != self.ignore_index)
            if t.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(torch.isfinite(t)):
                # from a bad row: name it
                check_values(embeddings, self.weight, labels, self.ignore_index,
                             num_classes=self.weight.shape[0] // self.subcenters)
        loss = self._loss(embeddings, labels, None, curriculum_t=t)
        if t is not self.t:
            with torch.no_grad():
                self.t.copy_(t)
        return loss
