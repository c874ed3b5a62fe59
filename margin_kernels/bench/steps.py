"""The implementations a benchmark times: the fused backends and the baselines,
each written here from its published algorithm, as one fwd+bwd step."""
from __future__ import annotations

FLOOR = "gemm-floor"
CPP_GEMMS = "cpp-gemms"
TRITON_SPLIT = "triton-split"
FLOORS = (FLOOR, CPP_GEMMS)  # bare GEMMs: timed, but no memory or loss of their own
BASELINES = ("reference", "insightface", "torch-linear-ce")
# Fused linear cross-entropy of other libraries (plain softmax over x W^T, --margin
# none; ours runs NormSoftmax there): apple's cut-cross-entropy and Liger-Kernel.
# Both are Triton kernels for CUDA; benchmarks/fetch_peers.sh gets their wheels.
PEERS = ("cce", "liger")


def margin_spec(name: str):
    import margin_kernels as mk

    return {"arcface": mk.ArcFace(), "cosface": mk.CosFace(), "none": mk.NormSoftmax(), "adaface": mk.AdaFace(),
            "magface": mk.MagFace(), "curricular": mk.CurricularFace(), "subcenter": mk.ArcFace()}[name]


# Sub-center ArcFace runs with the paper's K = 3: a [3 C, D] weight.
SUBCENTERS = {"subcenter": 3}


def weight_rows(margin_name: str, classes: int) -> int:
    """Rows of the benchmark's weight for ``classes`` classes."""
    return classes * SUBCENTERS.get(margin_name, 1)


# Margins with state or terms beyond a fixed per-row triple (norms, running
# statistics, hard negatives, sub-centers): the fused backends run them as their
# heads do, the naive baseline is the reference written from the paper.
FEATURE_MARGINS = ("adaface", "magface", "curricular", "subcenter")


def _feature_margin_step(impl: str, margin_name: str, x, w, y):
    import torch

    import margin_kernels as mk
    from margin_kernels import reference
    from margin_kernels.functional import target_cosines

    spec = margin_spec(margin_name)
    mean, std = torch.tensor(20.0, device=x.device), torch.tensor(100.0, device=x.device)
    backend = "triton" if impl == TRITON_SPLIT else impl
    options = mk.KernelOptions(triton_backward="split") if impl == TRITON_SPLIT else None
    t = torch.tensor(0.3, device=x.device)  # CurricularFace's running t, mid-training
    if impl == "reference":
        if margin_name == "adaface":
            return lambda: reference.adaface_loss(x, w, y, mean, std).backward()
        if margin_name == "curricular":
            return lambda: reference.curricularface_loss(x, w, y, t)[0].backward()
        if margin_name == "subcenter":
            return lambda: reference.subcenter_loss(x, w, y, subcenters=SUBCENTERS[margin_name]).backward()
        return lambda: reference.magface_loss(x, w, y).backward()
    if impl not in ("cpp", "triton", TRITON_SPLIT):
        raise RuntimeError(f"{impl} has no {margin_name} loss")

    def step():
        if margin_name == "adaface":
            margins = spec.margins_from_norms(spec.clipped_norms(x), mean, std)
            loss = mk.margin_cross_entropy(x, w, y, spec, backend=backend, margins=margins, options=options)
        elif margin_name == "curricular":  # as nn.CurricularFace: update t, then the loss
            t_step = spec.updated_t(t, target_cosines(x, w, y), torch.ones_like(y, dtype=torch.bool))
            loss = mk.margin_cross_entropy(x, w, y, spec, backend=backend, curriculum_t=t_step, options=options)
        elif margin_name == "subcenter":
            loss = mk.margin_cross_entropy(x, w, y, spec, backend=backend, subcenters=SUBCENTERS[margin_name],
                                           options=options)
        else:
            a = spec.magnitudes(x)
            loss = mk.margin_cross_entropy(x, w, y, spec, backend=backend, margins=spec.margins_from_magnitudes(a),
                                           options=options) + spec.regularizer(a).mean()
        loss.backward()

    return step


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
    if margin_name in FEATURE_MARGINS and impl not in FLOORS:
        return _feature_margin_step(impl, margin_name, x, w, y)
    if impl in ("reference", "cpp", "triton"):

        def step():
            mk.margin_cross_entropy(x, w, y, margin, backend=impl).backward()

    elif impl == TRITON_SPLIT:  # the Triton backend with the split backward (no dW atomics)
        split = mk.backends.KernelOptions(triton_backward="split")

        def step():
            mk.margin_cross_entropy(x, w, y, margin, backend="triton", options=split).backward()

    elif impl == "insightface":

        def step():
            _insightface_step(x, w, y, margin)

    elif impl == "torch-linear-ce":

        def step():
            F.linear_cross_entropy(x, w, y).backward()

    elif impl in PEERS:
        step = _peer_step(impl, x, w, y)

    elif impl == FLOOR:
        dz = torch.randn(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)

        def step():  # the three GEMMs any exact fused loss must do
            with torch.no_grad():
                x @ w.t()
                dz @ w
                dz.t() @ x

    elif impl == CPP_GEMMS:
        step = _cpp_gemms_step(x, w)

    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return step


def _peer_step(impl: str, x, w, y):
    """One fwd+bwd of a peer library's fused linear cross-entropy, with its
    defaults (cut-cross-entropy filters small gradient entries by default)."""
    if x.device.type != "cuda":
        raise RuntimeError(f"{impl} runs on CUDA only")
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda: linear_cross_entropy(x, w, y).backward()
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    return lambda: LigerFusedLinearCrossEntropyFunction.apply(x, w, y)[0].backward()


def _cpp_gemms_step(x, w):
    """The GEMMs the cpp backend runs for this problem, at its block sizes and
    operand types, with no epilogue. Class-blocked sweep: forward logits per
    block, then per block the recomputed logits, dx += dz W_blk and
    dW_blk = dz^T x. Row-chunked shortcut (where cpp prefers it): per row chunk
    the logits over all classes, dx = e W and dW += e^T x. cpp's time over this
    one is what its epilogues, norms and margins cost."""
    import torch

    from margin_kernels import backends

    cpp = backends.load("cpp")
    options = backends.KernelOptions().resolved()
    workspace = options.workspace_bytes
    batch, dim, classes = x.shape[0], x.shape[1], w.shape[0]
    on_cuda = x.device.type == "cuda"
    # CUDA: operands in the input dtype, fp32 out (cuBLAS); CPU: fp32 blocks.
    op_dtype = x.dtype if on_cuda else torch.float32
    x_op = x.detach().to(op_dtype)

    def mm(a, b):
        return torch.mm(a, b) if a.dtype == torch.float32 else torch.mm(a, b, out_dtype=torch.float32)

    if cpp.prefers_fused(w, batch, options):
        rows = min(cpp.block_rows(classes, workspace), batch)
        e = torch.randn(rows, classes, device=x.device)

        def step():
            with torch.no_grad():
                dw = torch.zeros(classes, dim, device=x.device)
                for r0 in range(0, batch, rows):
                    x_blk = x_op[r0 : r0 + rows]
                    e_blk = e[: x_blk.shape[0]]
                    torch.mm(x_blk, w.t(), out=e_blk)
                    mm(e_blk, w)
                    dw.addmm_(e_blk.t(), x_blk)

        return step

    k = min(cpp.block_classes(batch, dim, w.dtype != torch.float32, workspace), classes)
    dz = torch.randn(batch, k, device=x.device).to(op_dtype)

    def step():
        with torch.no_grad():
            for c0 in range(0, classes, k):
                mm(x_op, w[c0 : c0 + k].to(op_dtype).t())
            dx = torch.zeros(batch, dim, device=x.device)
            for c0 in range(0, classes, k):
                w_blk = w[c0 : c0 + k].to(op_dtype)
                d = dz[:, : w_blk.shape[0]]
                mm(x_op, w_blk.t())
                dx += mm(d, w_blk)
                mm(d.t(), x_op)

    return step
