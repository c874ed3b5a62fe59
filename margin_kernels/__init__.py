"""Fused margin-softmax losses (ArcFace, CosFace, ElasticFace, ...) that never
build the batch x classes logits matrix. See README.md and docs/DESIGN.md."""
import torch  # noqa: F401  (before _C, whose symbols live in libtorch)

from . import backends, nn, official, subcenters
from .backends import KernelOptions
from .functional import draw_margins, margin_cross_entropy
from .partial_fc import PartialFC
from .margins import (
    AdaFace,
    ArcFace,
    CombinedMargin,
    CosFace,
    CurricularFace,
    ElasticArcFace,
    ElasticCosFace,
    MagFace,
    Margin,
    MarginStep,
    MVSoftmax,
    NormSoftmax,
    RowMargins,
    SphereFace,
)

__version__ = "0.1.0"

__all__ = [
    "AdaFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "ElasticArcFace",
    "ElasticCosFace",
    "KernelOptions",
    "MagFace",
    "Margin",
    "MarginStep",
    "MVSoftmax",
    "NormSoftmax",
    "PartialFC",
    "RowMargins",
    "SphereFace",
    "backends",
    "draw_margins",
    "margin_cross_entropy",
    "nn",
    "official",
    "subcenters",
]
