"""Margin specifications and the per-row target transform (docs/DESIGN.md §1).

Every margin is a choice of the per-row triple (m1, m2, m3) and the scale s:

    t_i = cos(m1_i * theta_i + m2_i) - m3_i,     theta_i = arccos(cos_target_i)

plus, for some families, a rule for hard negatives and an extra loss term.
A spec's :meth:`Margin.step` is the one hook every caller (the heads,
``PartialFC``, the functional form, the benchmark) goes through: from a batch
and the spec's running state it gives the per-row margins, the hard-negative
rule (:class:`HardNegatives`), a per-row penalty and the state after the batch
(:class:`MarginStep`). :func:`target_logit` turns the target cosines into the
target logit ``s * t`` and its slope ``dt/dc``: with the hard-negative rule,
all a fused kernel needs to know of the margin.
"""
from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Callable, ClassVar, Literal, Mapping, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Margin",
    "RowMargins",
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
    "HardNegatives",
    "StepBatch",
    "MarginStep",
    "FAMILIES",
    "target_logit",
]

Overflow = Literal["classic", "none", "clip"]

# overflow="clip" (AdaFace's rule): the margined angle is clipped into
# [CLIP_EPS, pi - CLIP_EPS], with a zero slope where the clip acts.
CLIP_EPS = 1e-3

# Floor on ||v|| when normalizing a row (F.normalize's eps): rows at or below it
# are rejected as zero rows by the argument checks.
NORM_EPS = 1e-12

# Stand-in for sin(theta) = 0 in the slope m1 sin(m1 theta + m2) / sin(theta):
# the true derivative diverges at theta = 0 or pi exactly when m2 > 0, and the
# fused paths multiply the slope by a direction that is then exactly zero.
SIN_EPS = 1e-6


class RowMargins(NamedTuple):
    """The per-row margin triple, tensors of shape [B]: float32, float64 for
    float64 embeddings."""

    m1: Tensor
    m2: Tensor
    m3: Tensor


class HardNegatives(NamedTuple):
    """The hard-negative rule per row, float64 tensors of shape [B]: a
    non-target cosine c above ``threshold`` (strictly) counts as
    m(c) = (a c + b) c + d, with derivative 2 a c + b; the others stay c.
    ``threshold`` is +inf where nothing is hard (ignored rows). One rule, as
    data, for every family that reweights its hard negatives:
    CurricularFace (a = 1, b = t, d = 0) and MV-Softmax (a = 0, b = t, d = t - 1)."""

    threshold: Tensor
    a: Tensor
    b: Tensor
    d: Tensor

    def packed(self) -> Tensor:
        """The kernels' form: float32 [4, B] (threshold, a, b, d), contiguous."""
        return torch.stack([v.detach().double() for v in self]).float().contiguous()


class StepBatch(NamedTuple):
    """What a spec's :meth:`Margin.step` sees of a batch."""

    embeddings: Tensor  # [B, D] every row of the step (all ranks' under PartialFC), with autograd history
    valid: Tensor  # [B] bool: rows whose label is not ignored
    cos_target: Tensor  # [B] float64 cos(x_i, w_{y_i}), detached; 0 where ignored
    sin_target: Tensor  # [B] float64 sin of the same angle, from the vectors
    generator: torch.Generator | None = None  # source of random draws
    # makes a random draw the same on every rank (rank 0's); the identity on one process
    shared: Callable[[Tensor], Tensor] = lambda t: t


class MarginStep(NamedTuple):
    """What a spec gives the loss for one batch."""

    margins: RowMargins  # per-row (m1, m2, m3), possibly with autograd history (MagFace)
    hard: HardNegatives | None = None  # the hard-negative rule, or None
    penalty: Tensor | None = None  # [B] a term added to each valid row's loss (MagFace's regularizer)
    state: Mapping[str, Tensor] = {}  # the running state after this batch (what the caller commits)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _finite(name: str, value: float) -> None:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
             f"{name} must be a finite number, got {value!r}")


# Largest scale accepted: s * cos must stay far inside float32 (s = 3e38 turned
# the logsumexp into inf - inf); published recipes use s <= 128.
MAX_SCALE = 1e4
# Meaningful ranges of the margins: an angular margin of pi/2 or more, or an
# additive one of 1 or more, turns the margin into a bonus or makes every target
# the least likely class. ``allow_any_margin=True`` lifts these bounds.
ANGULAR_RANGE = (0.0, math.pi / 2)
ADDITIVE_RANGE = (0.0, 1.0)


def _margin_range(spec: "Margin", name: str, value: float, bounds: tuple[float, float], what: str) -> None:
    _finite(name, value)
    if spec.allow_any_margin:
        return
    lo, hi = bounds
    _require(lo <= value < hi, f"{name} must be in [{lo:g}, {hi:.4g}) for {what} (got {value}); pass "
             f"allow_any_margin=True to use it anyway")


@dataclass(frozen=True)
class Margin:
    """Base of every margin spec: the scale and the behaviour shared by all."""

    s: float = 64.0
    _: KW_ONLY
    overflow: Overflow = "classic"
    easy_margin: bool = False
    detach_margin: bool = False
    allow_any_margin: bool = False

    #: True for specs whose per-row margins depend on the target cosines.
    needs_target_cosine: ClassVar[bool] = False
    #: Names of the running state the spec keeps between steps (the heads' buffers).
    state_names: ClassVar[tuple[str, ...]] = ()
    #: The family's short name (the benchmark's ``--margin``).
    short_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _finite("s", self.s)
        _require(0 < self.s <= MAX_SCALE, f"s must be > 0 and <= {MAX_SCALE:g}, got {self.s}")
        _require(self.overflow in ("classic", "none", "clip"),
                 f"overflow must be 'classic', 'none' or 'clip', got {self.overflow!r}")

    def fixed_triple(self) -> tuple[float, float, float]:
        """(m1, m2, m3) of a fixed margin; elastic specs override row_margins."""
        raise TypeError(f"{type(self).__name__} has no fixed margins: they depend on the batch (see step())")

    # ------------------------------------------------------------------ the family hook

    def initial_state(self, *, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The running state at the start of training, 0-d tensors by name
        (empty for a spec without state)."""
        return {}

    def check_state(self, state: Mapping[str, Tensor | float] | None, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> dict[str, Tensor] | None:
        """``state`` as the step takes it: the spec's names, 0-d tensors (floats
        are accepted) on ``device``, finite and in range; None stays None (the
        step raises if it needs the state)."""
        name = type(self).__name__
        if state is None:
            return None
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of {name}'s state by name, got {type(state).__name__}")
        _require(set(state) == set(self.state_names),
                 f"state must hold {name}'s {list(self.state_names) or 'nothing'}, got {sorted(state)}")
        out = {}
        for key in self.state_names:
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
                raise TypeError(f"state[{key!r}] must be a float or a 0-d tensor, got {type(value).__name__}")
            value = torch.as_tensor(value, dtype=dtype)
            _require(value.numel() == 1, f"state[{key!r}] must be a scalar, got shape {tuple(value.shape)}")
            out[key] = value.reshape(()).to(device=device, dtype=dtype)
        self._check_state_values(out)
        return out

    def _needs(self, state: Mapping[str, Tensor] | None) -> Mapping[str, Tensor]:
        """The state a step cannot do without."""
        if state is None and self.state_names:
            name = type(self).__name__
            raise ValueError(f"{name} keeps a running state ({', '.join(self.state_names)}): use "
                             f"margin_kernels.nn.{name} (which keeps it), or pass state= ({name}().initial_state() "
                             f"at the start of training)")
        return state or {}

    def _check_state_values(self, state: dict[str, Tensor]) -> None:
        """Range checks of a family's state (on CPU tensors only: reading a CUDA
        value back would cost a host sync per step)."""

    def step(self, batch: StepBatch, state: Mapping[str, Tensor] | None = None, *, update: bool = False,
             margins: RowMargins | None = None) -> MarginStep:
        """What this spec gives the loss for ``batch``: per-row margins, the
        hard-negative rule, a per-row penalty, and ``state`` after the batch
        (updated from it when ``update``, as in training; otherwise as given).

        ``margins`` replays given per-row margins instead of the spec's (the
        ``last_margins`` of a step): the rest of the step is the spec's.
        """
        if margins is None:
            margins = self.row_margins(batch.cos_target.shape[0], device=batch.cos_target.device,
                                       cos_target=batch.cos_target, valid=batch.valid, generator=batch.generator,
                                       dtype=_margin_dtype(batch.embeddings))
        return MarginStep(margins)

    def target(self, cos_target: Tensor, margins: RowMargins, sin_target: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The target cosine after the margin and its slope per row
        (:func:`target_logit` with this spec's rules)."""
        return target_logit(cos_target, margins, overflow=self.overflow, easy_margin=self.easy_margin,
                            detach_margin=self.detach_margin, sin_target=sin_target)

    def row_margins(
        self,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        cos_target: Tensor | None = None,
        valid: Tensor | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> RowMargins:
        """Per-row (m1, m2, m3) for a batch of ``batch_size`` rows, in ``dtype``
        (float64 for float64 embeddings: the margins' values as given).

        ``cos_target`` (the rows' target cosines) and ``valid`` (rows whose label
        is not ignored) are used only by the sorted elastic variants; elastic
        draws come from ``generator`` so that a step can be reproduced.
        """
        m1, m2, m3 = self.fixed_triple()
        full = lambda v: torch.full((batch_size,), float(v), dtype=dtype, device=device)  # noqa: E731
        return RowMargins(full(m1), full(m2), full(m3))


@dataclass(frozen=True)
class NormSoftmax(Margin):
    """Normalized softmax: cosine logits scaled by ``s``, no margin."""

    short_name: ClassVar[str] = "normsoftmax"

    def fixed_triple(self) -> tuple[float, float, float]:
        return 1.0, 0.0, 0.0


@dataclass(frozen=True)
class CosFace(Margin):
    """CosFace / AM-Softmax: target logit ``s * (cos theta - m)``."""

    short_name: ClassVar[str] = "cosface"

    m: float = 0.35

    def __post_init__(self) -> None:
        super().__post_init__()
        _margin_range(self, "m", self.m, ADDITIVE_RANGE, "an additive cosine margin")

    def fixed_triple(self) -> tuple[float, float, float]:
        return 1.0, 0.0, float(self.m)


@dataclass(frozen=True)
class ArcFace(Margin):
    """ArcFace: target logit ``s * cos(theta + m)``."""

    short_name: ClassVar[str] = "arcface"

    m: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _margin_range(self, "m", self.m, ANGULAR_RANGE, "an additive angular margin")

    def fixed_triple(self) -> tuple[float, float, float]:
        return 1.0, float(self.m), 0.0


@dataclass(frozen=True)
class SphereFace(Margin):
    """SphereFace-style multiplicative angular margin: ``s * cos(m * theta)``."""

    short_name: ClassVar[str] = "sphereface"

    m: float = 1.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _finite("m", self.m)
        _require(self.m >= 1, f"m must be >= 1 for SphereFace, got {self.m}")

    def fixed_triple(self) -> tuple[float, float, float]:
        return float(self.m), 0.0, 0.0


@dataclass(frozen=True)
class CombinedMargin(Margin):
    """insightface's combined margin ``s * (cos(m1 theta + m2) - m3)``, all three applied."""

    short_name: ClassVar[str] = "combined"

    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _finite("m1", self.m1)
        _require(self.m1 >= 1, f"m1 must be >= 1, got {self.m1}")
        _margin_range(self, "m2", self.m2, ANGULAR_RANGE, "an additive angular margin")
        _margin_range(self, "m3", self.m3, ADDITIVE_RANGE, "an additive cosine margin")

    def fixed_triple(self) -> tuple[float, float, float]:
        return float(self.m1), float(self.m2), float(self.m3)


@dataclass(frozen=True)
class _Elastic(Margin):
    """Margins drawn per row from N(m, std); ``plus`` sorts them (ElasticFace+)."""

    m: float = 0.5
    std: float | None = None
    plus: bool = False

    needs_target_cosine: ClassVar[bool] = True  # only consulted when plus=True
    _default_std: ClassVar[tuple[float, float]] = (0.05, 0.05)  # (plain, plus)
    _range: ClassVar[tuple[float, float]] = ANGULAR_RANGE
    _what: ClassVar[str] = "the mean margin"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.std is None:
            object.__setattr__(self, "std", self._default_std[1] if self.plus else self._default_std[0])
        _margin_range(self, "m", self.m, self._range, self._what)
        _finite("std", self.std)
        _require(self.std >= 0, f"std must be >= 0, got {self.std}")

    def _draw(self, batch_size: int, device: torch.device | str, generator: torch.Generator | None,
              dtype: torch.dtype) -> Tensor:
        # Drawn in float32 whatever ``dtype``: the same generator state gives
        # the same margins to a float32 step and to its float64 oracle.
        if self.std == 0:
            return torch.full((batch_size,), float(self.m), dtype=dtype, device=device)
        mean = torch.full((batch_size,), float(self.m), dtype=torch.float32, device=device)
        return torch.normal(mean, float(self.std), generator=generator).to(dtype)

    def _place(self, m: Tensor) -> RowMargins:
        raise NotImplementedError

    def step(self, batch, state=None, *, update=False, margins=None):
        if margins is not None:
            return MarginStep(margins)
        drawn = super().step(batch, state).margins
        return MarginStep(RowMargins(*batch.shared(torch.stack(list(drawn)).contiguous())))

    def row_margins(self, batch_size, *, device="cpu", cos_target=None, valid=None, generator=None,
                    dtype=torch.float32):
        m = self._draw(batch_size, device, generator, dtype)
        if self.plus:
            if cos_target is None:
                raise ValueError(f"{type(self).__name__}(plus=True) needs cos_target to sort its margins")
            m = _sort_by_difficulty(m, cos_target, valid)
        return self._place(m)


def _margin_dtype(embeddings: Tensor) -> torch.dtype:
    return torch.float64 if embeddings.dtype == torch.float64 else torch.float32


def _sort_by_difficulty(m: Tensor, cos_target: Tensor, valid: Tensor | None) -> Tensor:
    """Give the valid row with the lowest target cosine the largest margin.

    The ElasticFace+ paper's intent. Its official code indexes the sorted margins
    by the sorting permutation instead of its inverse, which assigns them in an
    order unrelated to the cosines; we apply the monotone assignment.
    """
    rows = torch.arange(m.numel(), device=m.device) if valid is None else valid.nonzero().squeeze(1)
    out = m.clone()
    # easiest row first; ties (rows that round to the same cosine) in row order
    order = torch.argsort(cos_target[rows].detach(), descending=True, stable=True)
    out[rows[order]] = torch.sort(m[rows]).values  # ... gets the smallest margin
    return out


@dataclass(frozen=True)
class ElasticArcFace(_Elastic):
    """ElasticFace-Arc: ArcFace with m2 ~ N(m, std) per row (``plus``: sorted, std 0.0175)."""

    short_name: ClassVar[str] = "elastic-arc"

    m: float = 0.5
    _default_std: ClassVar[tuple[float, float]] = (0.05, 0.0175)
    _range: ClassVar[tuple[float, float]] = ANGULAR_RANGE
    _what: ClassVar[str] = "the mean of an additive angular margin"

    def _place(self, m: Tensor) -> RowMargins:
        return RowMargins(torch.ones_like(m), m, torch.zeros_like(m))


@dataclass(frozen=True)
class ElasticCosFace(_Elastic):
    """ElasticFace-Cos: CosFace with m3 ~ N(m, std) per row (``plus``: sorted, std 0.025)."""

    short_name: ClassVar[str] = "elastic-cos"

    m: float = 0.35
    _default_std: ClassVar[tuple[float, float]] = (0.05, 0.025)
    _range: ClassVar[tuple[float, float]] = ADDITIVE_RANGE
    _what: ClassVar[str] = "the mean of an additive cosine margin"

    def _place(self, m: Tensor) -> RowMargins:
        return RowMargins(torch.ones_like(m), torch.zeros_like(m), m)


@dataclass(frozen=True)
class AdaFace(Margin):
    """AdaFace (Kim et al., CVPR 2022): a margin adapted to feature quality,
    measured by the embedding norm against running batch statistics.

    Row i gets m1 = 1, m2 = -m r_i, m3 = m + m r_i with
    r_i = clip((n_i - mean) / (std + 1e-3) * h, -1, 1), n_i = clip(||x_i||, 0.001, 100)
    detached, and its angle clipped into [1e-3, pi - 1e-3] (``overflow="clip"``).
    The running statistics are state: :class:`margin_kernels.nn.AdaFace` keeps
    them as buffers and updates them (``momentum``) with each training batch
    before computing its margins; the functional form takes them as
    ``state={"batch_mean": ..., "batch_std": ...}``. Defaults are the official training's (m=0.4, h=0.333, s=64).
    See docs/DESIGN.md §1 for where we differ from the official code.
    """

    short_name: ClassVar[str] = "adaface"

    m: float = 0.4
    h: float = 0.333
    momentum: float = 0.01
    _: KW_ONLY
    overflow: Overflow = "clip"

    NORM_RANGE: ClassVar[tuple[float, float]] = (0.001, 100.0)
    STD_EPS: ClassVar[float] = 1e-3
    INITIAL_MEAN: ClassVar[float] = 20.0
    INITIAL_STD: ClassVar[float] = 100.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _margin_range(self, "m", self.m, ADDITIVE_RANGE, "AdaFace's margin")
        _finite("h", self.h)
        # h = 0: the margin no longer adapts (every row m2 = 0, m3 = m), as the
        # official config file's default trains it
        _require(self.h >= 0, f"h must be >= 0, got {self.h}")
        _finite("momentum", self.momentum)
        _require(0 < self.momentum <= 1, f"momentum must be in (0, 1], got {self.momentum}")

    def clipped_norms(self, embeddings: Tensor) -> Tensor:
        """n_i = clip(||x_i||, 0.001, 100), detached, float32 (float64 for float64)."""
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        norms = torch.linalg.vector_norm(embeddings.detach().to(dtype), dim=1)
        return norms.clamp(*self.NORM_RANGE)

    def updated_statistics(self, mean: Tensor, std: Tensor, norms: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) after a batch: an EMA of the valid rows' mean and unbiased
        std, computed on the device without a host sync. No valid row leaves
        both alone; one leaves the std alone (its std is undefined, and NaN
        would stay in the running value for good)."""
        keep = valid.to(norms.dtype)
        count = keep.sum()
        batch_mean = (norms * keep).sum() / count.clamp_min(1)
        batch_var = (((norms - batch_mean) * keep) ** 2).sum() / (count - 1).clamp_min(1)
        a = self.momentum
        new_mean = torch.where(count >= 1, a * batch_mean + (1 - a) * mean, mean)
        new_std = torch.where(count >= 2, a * batch_var.sqrt() + (1 - a) * std, std)
        return new_mean.to(mean.dtype), new_std.to(std.dtype)

    def margins_from_norms(self, norms: Tensor, mean: Tensor | float, std: Tensor | float) -> RowMargins:
        """The per-row (m1, m2, m3) for clipped norms and running statistics, in
        the norms' dtype (float32, or float64 for float64 embeddings)."""
        r = ((norms - mean) / (std + self.STD_EPS) * self.h).clamp(-1.0, 1.0).to(norms.dtype)
        return RowMargins(torch.ones_like(r), -self.m * r, self.m + self.m * r)

    state_names: ClassVar[tuple[str, ...]] = ("batch_mean", "batch_std")

    def initial_state(self, *, device=None, dtype=torch.float32):
        return {"batch_mean": torch.tensor(self.INITIAL_MEAN, device=device, dtype=dtype),
                "batch_std": torch.tensor(self.INITIAL_STD, device=device, dtype=dtype)}

    def _check_state_values(self, state):
        for key, value in state.items():
            if value.device.type == "cpu" and not torch.compiler.is_compiling():
                _require(bool(torch.isfinite(value)) and (key == "batch_mean" or bool(value >= 0)),
                         f"state[{key!r}] must be finite{'' if key == 'batch_mean' else ' and >= 0'}, "
                         f"got {value.item()}")

    def step(self, batch, state=None, *, update=False, margins=None):
        """Margins from the rows' clipped norms and the running statistics,
        updated first with the batch's valid rows when ``update``."""
        if margins is not None:  # the statistics only set the margins
            return MarginStep(margins, state=state or {})
        state = self._needs(state)
        mean, std = state["batch_mean"], state["batch_std"]
        norms = self.clipped_norms(batch.embeddings)
        if update:
            with torch.no_grad():
                mean, std = self.updated_statistics(mean, std, norms, batch.valid)
        return MarginStep(self.margins_from_norms(norms, mean, std), state={"batch_mean": mean, "batch_std": std})


@dataclass(frozen=True)
class MagFace(Margin):
    """MagFace (Meng et al., CVPR 2021): an ArcFace margin that grows with the
    feature magnitude a = clamp(||x||, l_a, u_a), m(a) = l_m + (u_m - l_m)(a - l_a)/(u_a - l_a),
    plus the regularizer lambda_g g(a), g(a) = a / u_a^2 + 1 / a. The gradient
    flows through a into both. The official training uses the easy margin (the
    default here); ``easy_margin=False`` gives the classic rule.
    :class:`margin_kernels.nn.MagFace` computes both terms from the embeddings.
    """

    short_name: ClassVar[str] = "magface"

    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0
    _: KW_ONLY
    easy_margin: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("l_a", "u_a", "lambda_g"):
            _finite(name, getattr(self, name))
        _require(0 < self.l_a < self.u_a, f"need 0 < l_a < u_a, got l_a={self.l_a}, u_a={self.u_a}")
        _margin_range(self, "l_m", self.l_m, ANGULAR_RANGE, "MagFace's smallest margin")
        _margin_range(self, "u_m", self.u_m, ANGULAR_RANGE, "MagFace's largest margin")
        _require(self.l_m <= self.u_m, f"need l_m <= u_m, got l_m={self.l_m}, u_m={self.u_m}")
        _require(self.lambda_g >= 0, f"lambda_g must be >= 0, got {self.lambda_g}")

    def magnitudes(self, embeddings: Tensor) -> Tensor:
        """a_i = clamp(||x_i||, l_a, u_a), differentiable inside the range."""
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        return torch.linalg.vector_norm(embeddings.to(dtype), dim=1).clamp(self.l_a, self.u_a)

    def margins_from_magnitudes(self, a: Tensor) -> RowMargins:
        """Per-row (1, m(a), 0); m keeps a's autograd history."""
        m = self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)
        return RowMargins(torch.ones_like(m), m, torch.zeros_like(m))

    def regularizer(self, a: Tensor) -> Tensor:
        """lambda_g g(a) per row."""
        return self.lambda_g * (a / self.u_a**2 + 1.0 / a)

    def step(self, batch, state=None, *, update=False, margins=None):
        """m(a) per row and the regularizer as the penalty, both through a;
        replayed ``margins`` come without the penalty (the caller's, then)."""
        if margins is not None:
            return MarginStep(margins)
        a = self.magnitudes(batch.embeddings)
        return MarginStep(self.margins_from_magnitudes(a), penalty=self.regularizer(a))


@dataclass(frozen=True)
class CurricularFace(Margin):
    """CurricularFace (Huang et al., CVPR 2020): ArcFace's target (with the
    classic overflow rule) and hard negatives weighted by the training's progress.

    A non-target cosine c of row i above c_m,i = cos(theta_i + m) (the plain
    formula, strict >) counts as c (t + c), with derivative t + 2c (t detached);
    t is an exponential moving average of the valid rows' target cosines,
    t <- momentum mean(cos theta_y) + (1 - momentum) t, starting at 0 and updated
    with each training batch before its modulation. The running t is state:
    :class:`margin_kernels.nn.CurricularFace` keeps it as a buffer; the
    functional form takes it as ``state={"t": t}``. Defaults are the official
    training's (m=0.5, s=64, momentum 0.01).
    """

    short_name: ClassVar[str] = "curricular"

    m: float = 0.5
    momentum: float = 0.01

    INITIAL_T: ClassVar[float] = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _margin_range(self, "m", self.m, ANGULAR_RANGE, "an additive angular margin")
        _finite("momentum", self.momentum)
        _require(0 < self.momentum <= 1, f"momentum must be in (0, 1], got {self.momentum}")

    def fixed_triple(self) -> tuple[float, float, float]:
        return 1.0, float(self.m), 0.0

    def updated_t(self, t: Tensor, cos_target: Tensor, valid: Tensor) -> Tensor:
        """t after a batch: the EMA of the valid rows' target cosines, on the
        device (no host sync); a batch without a valid row leaves it alone."""
        keep = valid.to(cos_target.dtype)
        count = keep.sum()
        batch_mean = (cos_target * keep).sum() / count.clamp_min(1)
        new_t = torch.where(count >= 1, self.momentum * batch_mean + (1 - self.momentum) * t, t)
        return new_t.to(t.dtype)

    state_names: ClassVar[tuple[str, ...]] = ("t",)

    def initial_state(self, *, device=None, dtype=torch.float32):
        return {"t": torch.tensor(self.INITIAL_T, device=device, dtype=dtype)}

    def _check_state_values(self, state):
        t = state["t"]
        # A running mean of cosines. (A CUDA tensor is not read back: that
        # would cost a host sync per step.)
        if t.device.type == "cpu" and not torch.compiler.is_compiling():
            _require(bool(t.abs() <= 1), f"state['t'] must be finite and in [-1, 1] (a running mean of target "
                                         f"cosines), got {t.item()}")

    def step(self, batch, state=None, *, update=False, margins=None):
        """ArcFace's margins, and the hard negatives above cos(theta_y + m)
        weighted by t (updated first with the batch when ``update``)."""
        t = self._needs(state)["t"]
        if update:
            t = self.updated_t(t, batch.cos_target.to(t.dtype), batch.valid)
        if margins is None:
            margins = super().step(batch, state).margins
        c = batch.cos_target.double()
        threshold = _angle_plus(c, batch.sin_target.double(), self.m)
        t_row = t.detach().double().expand_as(c)
        hard = HardNegatives(_only_valid(threshold, batch.valid), torch.ones_like(c), t_row, torch.zeros_like(c))
        return MarginStep(margins, hard=hard, state={"t": t})


@dataclass(frozen=True)
class MVSoftmax(Margin):
    """MV-Softmax (Wang et al., AAAI 2020, "Mis-classified Vector Guided
    Softmax Loss"): a CosFace (``form="am"``) or ArcFace (``form="arc"``)
    target, and every negative whose cosine c exceeds the row's margined
    target cosine (c_y - m, or cos(theta_y + m); the plain formula, strict >)
    counts as t c + t - 1 (derivative t; t = 1 is the plain margin loss).

    Conventions of the public FaceX-Zoo head, which trains it (s = 32, m = 0.35,
    t = 1.12): the AM target falls back to c_y where c_y <= m, the Arc target
    to c_y where c_y <= 0 (the easy margin). The hard negatives' threshold is
    the margined cosine without those fallbacks, as theirs.
    """

    short_name: ClassVar[str] = "mv"

    s: float = 32.0
    m: float = 0.35
    t: float = 1.12
    _: KW_ONLY
    form: Literal["am", "arc"] = "am"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.form in ("am", "arc"), f"form must be 'am' or 'arc', got {self.form!r}")
        if self.form == "am":
            _margin_range(self, "m", self.m, ADDITIVE_RANGE, "an additive cosine margin")
        else:
            _margin_range(self, "m", self.m, ANGULAR_RANGE, "an additive angular margin")
        _finite("t", self.t)
        _require(self.t >= 1, f"t must be >= 1 (t = 1: no reweighting), got {self.t}")

    def fixed_triple(self) -> tuple[float, float, float]:
        return (1.0, 0.0, float(self.m)) if self.form == "am" else (1.0, float(self.m), 0.0)

    def target(self, cos_target, margins, sin_target=None):
        t, slope = super().target(cos_target, margins, sin_target)
        # the margin only where c_y > m (AM) or c_y > 0 (Arc), as FaceX-Zoo's head
        c = cos_target.to(t.dtype).clamp(-1.0, 1.0)
        keep = c > (self.m if self.form == "am" else 0.0)
        t = torch.where(keep, t, c)
        return t, torch.where(keep, slope, torch.ones_like(slope))

    def step(self, batch, state=None, *, update=False, margins=None):
        if margins is None:
            margins = super().step(batch, state).margins
        c = batch.cos_target.double()
        threshold = c - self.m if self.form == "am" else _angle_plus(c, batch.sin_target.double(), self.m)
        t = torch.full_like(c, float(self.t))
        hard = HardNegatives(_only_valid(threshold, batch.valid), torch.zeros_like(c), t, t - 1.0)
        return MarginStep(margins, hard=hard)


#: Every margin family, in the order of the README's table.
FAMILIES: tuple[type[Margin], ...] = (NormSoftmax, CosFace, ArcFace, SphereFace, CombinedMargin, ElasticArcFace,
                                      ElasticCosFace, AdaFace, MagFace, CurricularFace, MVSoftmax)


def _angle_plus(c: Tensor, sin: Tensor, m: float) -> Tensor:
    """cos(theta + m) = c cos m - sin(theta) sin m, the plain formula (no overflow rule)."""
    return c * math.cos(m) - sin * math.sin(m)


def _only_valid(threshold: Tensor, valid: Tensor) -> Tensor:
    """+inf (nothing is hard) on ignored rows."""
    return torch.where(valid, threshold, torch.full_like(threshold, math.inf))


def target_logit(
    cos_target: Tensor,
    margins: RowMargins,
    *,
    overflow: Overflow = "classic",
    easy_margin: bool = False,
    detach_margin: bool = False,
    sin_target: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Target cosine after the margin, ``t``, and its slope ``dt/dc`` per row.

    ``overflow="clip"``: the angle ``m1 theta + m2`` is clipped into
    [CLIP_EPS, pi - CLIP_EPS] (AdaFace's rule), slope 0 where the clip acts.
    ``overflow="classic"``: where ``m1 theta + m2 >= pi`` (cos would turn back
    up), use ``t = c - m2 sin(m2) - m3``, slope 1. For m1 = 1 this is ArcFace's
    ``th = cos(pi - m)``, ``mm = m sin m`` rule; for m1 != 1 we keep the same
    offset, so a pure multiplicative margin (m2 = 0) falls back to ``c - m3``.
    ``easy_margin``: no margin where ``c <= 0``. ``detach_margin``: slope 1 and
    ``t`` detached from the margins (the margin as a constant offset, as
    insightface and opensphere train; MagFace's m(a) then passes no gradient).
    Rows with m1 = 1 and m2 = 0 skip the angle: ``t = c - m3`` exactly.

    ``sin_target`` (sin theta from the vectors, e.g. ||w_hat - c x_hat||) gives
    theta = atan2(sin, c), exact where cos rounds to +-1; without it theta =
    arccos(c) and sin theta = sqrt(1 - c^2), floored at SIN_EPS in the slope.
    Float64 inputs are computed in float64, others in float32.
    """
    dtype = torch.float64 if cos_target.dtype == torch.float64 else torch.float32
    c = cos_target.to(dtype).clamp(-1.0, 1.0)
    m1, m2, m3 = (v.to(dtype) for v in margins)
    if sin_target is None:
        theta = torch.acos(c)
        sin_theta = ((1.0 - c) * (1.0 + c)).sqrt()
    else:
        sin_theta = sin_target.to(dtype)
        theta = torch.atan2(sin_theta, c)
    angle = m1 * theta + m2
    plain = (m1 == 1.0) & (m2 == 0.0) & (overflow != "clip")
    if overflow == "clip":
        clipped = angle.clamp(CLIP_EPS, math.pi - CLIP_EPS)
        t = torch.cos(clipped) - m3
    else:
        t = torch.where(plain, c - m3, torch.cos(angle) - m3)
    # sin theta = 0 only at theta = 0 or pi exactly, where the direction the
    # slope multiplies is zero: the floor keeps it finite there
    safe_sin = torch.where(sin_theta > 0, sin_theta, torch.full_like(sin_theta, SIN_EPS))
    slope = torch.where(plain, torch.ones_like(c), m1 * torch.sin(angle) / safe_sin)
    if overflow == "classic":
        over = angle >= math.pi
        t = torch.where(over, c - m2 * torch.sin(m2) - m3, t)
        slope = torch.where(over, torch.ones_like(c), slope)
    elif overflow == "clip":
        slope = torch.where(angle == clipped, slope, torch.zeros_like(c))
    if easy_margin:
        t = torch.where(c > 0, t, c)
        slope = torch.where(c > 0, slope, torch.ones_like(c))
    if detach_margin:  # the margin a constant offset: slope 1, and no gradient to margins that carry one (MagFace)
        slope = torch.ones_like(c)
        t = t.detach()
    return t, slope
