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


# --margin: "none" is plain softmax (NormSoftmax: torch's linear_cross_entropy
# and the peers run beside it), "subcenter" is ArcFace with the paper's K = 3
# sub-centers (a [3 C, D] weight), the rest are the families' short names.
PLAIN, SUBCENTER = "none", "subcenter"
SUBCENTERS = {SUBCENTER: 3}
# The margins insightface's recipe computes (its baseline runs beside them);
# the others run against the reference alone.
INSIGHTFACE_MARGINS = ("arcface", "cosface", PLAIN)


def margin_names() -> tuple[str, ...]:
    from margin_kernels.margins import FAMILIES

    return (PLAIN, SUBCENTER) + tuple(spec.short_name for spec in FAMILIES if spec.short_name != "normsoftmax")


def margin_spec(name: str):
    from margin_kernels.margins import FAMILIES, ArcFace, NormSoftmax

    named = {PLAIN: NormSoftmax, SUBCENTER: ArcFace} | {spec.short_name: spec for spec in FAMILIES}
    return named[name]()


def weight_rows(margin_name: str, classes: int) -> int:
    """Rows of the benchmark's weight for ``classes`` classes."""
    return classes * SUBCENTERS.get(margin_name, 1)


def _loss_step(impl: str, margin_name: str, x, w, y):
    """One fwd+bwd of the loss: the margin's step (its state as at the start
    of training), then the loss; the reference computes everything on its
    own, naively, from the same state."""
    from margin_kernels import KernelOptions, reference
    from margin_kernels.functional import margin_loss_step

    spec = margin_spec(margin_name)
    k = SUBCENTERS.get(margin_name, 1)
    state = spec.initial_state(device=x.device) or None
    if impl == "reference":
        return lambda: reference.margin_cross_entropy(x, w, y, spec, state=state, subcenters=k)[0].backward()
    backend = "triton" if impl == TRITON_SPLIT else impl
    options = KernelOptions(triton_backward="split") if impl == TRITON_SPLIT else None

    def step():
        margin_loss_step(x, w, y, spec, backend=backend, options=options, state=state, subcenters=k)[0].backward()

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

    if impl in ("reference", "cpp", "triton", TRITON_SPLIT):
        step = _loss_step(impl, margin_name, x, w, y)

    elif impl == "insightface":
        if margin_name not in INSIGHTFACE_MARGINS:
            raise RuntimeError(f"insightface's recipe has no {margin_name} loss")
        margin = margin_spec(margin_name)

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

    if cpp.prefers_single_pass(w, batch, options):
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
