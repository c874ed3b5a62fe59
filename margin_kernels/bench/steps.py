"""The implementations a benchmark times: the fused backends and the baselines,
each written here from its published algorithm, as one fwd+bwd step."""
from __future__ import annotations

FLOOR = "gemm-floor"
BASELINES = ("reference", "insightface", "torch-linear-ce")


def margin_spec(name: str):
    import margin_kernels as mk

    return {"arcface": mk.ArcFace(), "cosface": mk.CosFace(), "none": mk.NormSoftmax()}[name]


def _insightface_step(x, w, y, margin):
    """insightface's arcface_torch recipe, from its published algorithm: normalize,
    linear, clamp, the margin applied in place under no_grad on the whole logits
    matrix (arccos / cos of every entry for the angular margin), scale, softmax CE."""
    import torch
    import torch.nn.functional as F

    m1, m2, m3 = margin.fixed_triple()
    logits = F.linear(F.normalize(x.float()), F.normalize(w.float())).clamp(-1, 1)
    rows = torch.arange(y.shape[0], device=y.device)
    with torch.no_grad():
        if m2 > 0:
            logits.arccos_()
            logits[rows, y] += m2
            logits.cos_()
        elif m3 > 0:
            logits[rows, y] -= m3
    loss = F.cross_entropy(logits * margin.s, y)
    loss.backward()


def make_step(impl: str, margin_name: str, x, w, y):
    import torch
    import torch.nn.functional as F

    import margin_kernels as mk

    margin = margin_spec(margin_name)
    if impl in ("reference", "cpp", "triton"):

        def step():
            mk.margin_cross_entropy(x, w, y, margin, backend=impl).backward()

    elif impl == "insightface":

        def step():
            _insightface_step(x, w, y, margin)

    elif impl == "torch-linear-ce":

        def step():
            F.linear_cross_entropy(x, w, y).backward()

    elif impl == FLOOR:
        dz = torch.randn(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)

        def step():  # the three GEMMs any exact fused loss must do
            with torch.no_grad():
                x @ w.t()
                dz @ w
                dz.t() @ x

    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return step
