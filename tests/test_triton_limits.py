"""The Triton path at the scale the library advertises, proved without a GPU:
64-bit index math at 10M classes, launch grids inside CUDA's limits up to 100M
classes, launches on the tensors' device, fp16 gradient tiles that stay finite,
bucketed autotuning, and no fp32 copy of a bf16 weight's gradient."""
import pytest
import torch

import margin_kernels as mk
from margin_kernels import backends

from conftest import backend_device, make_problem, rel_err

pytestmark = pytest.mark.skipif(not backends.is_available("triton"), reason="triton backend unavailable")

DEVICE = backend_device("triton")
AXIS0_MAX, AXIS12_MAX = 2**31 - 1, 65_535


@pytest.fixture(scope="module")
def tb():
    from margin_kernels.backends import triton_backend

    return triton_backend


@pytest.fixture(params=["atomic", "split"])
def strategy(request, monkeypatch):
    monkeypatch.setenv("MARGIN_KERNELS_TRITON_BACKWARD", request.param)
    return request.param


# ---------------------------------------------------------------- 64-bit offsets

if backends.is_available("triton"):
    import triton
    import triton.language as tl

    from margin_kernels.backends.triton_kernels.tiles import offsets, subcenter_rows, tile_columns

    @triton.jit
    def offsets_kernel(OUT, CLASS_INDEX, pid_n, C, stride_w, D, HAS_INDEX: tl.constexpr, BLOCK_N: tl.constexpr):
        """The offsets the kernels load W's last 4 columns of class tile pid_n from."""
        cols, col_ok = tile_columns(pid_n, C, BLOCK_N)
        _, w_rows = subcenter_rows(cols, C, CLASS_INDEX, 0, 1, HAS_INDEX)
        ks = D - 4 + tl.arange(0, 4)
        tl.store(OUT + tl.arange(0, BLOCK_N)[:, None] * 4 + tl.arange(0, 4)[None, :], offsets(w_rows, stride_w, ks))


def test_offsets_of_the_last_row_at_10m_classes():
    """The kernels' column -> W row -> element offset math, run under the
    interpreter (or on the GPU) at C = 10M, D = 512 without allocating W: the
    last class's last element sits at 5,119,999,999 > 2^31."""
    c, d, block_n = 10_000_000, 512, 64
    last_tile = (c - 1) // block_n
    for has_index in (False, True):
        out = torch.zeros(block_n, 4, dtype=torch.int64, device=DEVICE)
        index = torch.arange(c - block_n, c, device=DEVICE)  # the last 64 classes, as positions 0..63
        if has_index:
            offsets_kernel[(1,)](out, index, 0, block_n, d, d, HAS_INDEX=True, BLOCK_N=block_n)
        else:
            offsets_kernel[(1,)](out, index, last_tile, c, d, d, HAS_INDEX=False, BLOCK_N=block_n)
        cls = c - block_n + torch.arange(block_n) if has_index else torch.clamp(
            last_tile * block_n + torch.arange(block_n), max=c - 1)
        expected = cls[:, None] * d + torch.arange(d - 4, d)[None, :]
        assert torch.equal(out.cpu(), expected), has_index
        assert int(out.max()) == c * d - 1 == 5_119_999_999


# ---------------------------------------------------------------- launch grids

@pytest.mark.parametrize("c", [1, 4_200_000, 10_000_000, 100_000_000])
@pytest.mark.parametrize("b", [1, 1024, 65_536])
def test_every_launch_grid_fits_cuda_limits(tb, c, b):
    from margin_kernels.backends import triton_kernels as K
    from margin_kernels.backends.triton_kernels import autotune as A

    d = 512

    def fits(grid):
        assert 1 <= grid[0] <= AXIS0_MAX and all(1 <= g <= AXIS12_MAX for g in grid[1:]), grid

    fits(K.norm_grid(c))
    fits(K.project_grid(c))
    for kind in ("fwd", "bwd", "bwd_dw", "bwd_dx"):
        for cfg in A.candidates(kind, interpret=False) + A.candidates(kind, interpret=True):
            meta = cfg.kwargs
            if kind == "fwd":
                fits(K.forward_grid(b, K.forward_splits(b, c, 2**26), meta))
            elif kind == "bwd":
                fits(K.atomic_grid(b, c, meta))
            elif kind == "bwd_dw":
                fits(K.dw_grid(c, d, meta))
            else:
                fits(K.dx_grid(b, c, d, meta))


if backends.is_available("triton"):
    from margin_kernels.backends.triton_kernels.atomic_backward import atomic_tile

    @triton.jit
    def order_probe_kernel(OUT, B, BLOCK_M: tl.constexpr):
        """Each program writes the (row tile, class tile) it runs at its slot in
        launch order (CUDA dispatches blocks by x + y * gridDim.x)."""
        pid_m, pid_n = atomic_tile(B, BLOCK_M)
        slot = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)).to(tl.int64)
        tl.store(OUT + 2 * slot, pid_m)
        tl.store(OUT + 2 * slot + 1, pid_n)


@pytest.mark.parametrize("b, c, max_yz", [(300, 500, 65_535), (64, 700, 65_535), (200, 900, 4), (1, 300, 65_535),
                                          (130, 1_000, 3)])
def test_the_atomic_backward_runs_every_row_tile_of_a_class_tile_together(tb, monkeypatch, b, c, max_yz):
    """Programs adjacent in launch order cover distinct row tiles (every row
    tile of a class tile before the next class tile), and every (row tile,
    class tile) runs exactly once, also where class tiles are grouped to keep
    grid axis 1 within its limit (forced here by a small limit)."""
    from margin_kernels.backends.triton_kernels import atomic_backward

    monkeypatch.setattr(atomic_backward, "MAX_GRID_YZ", max_yz)
    meta = {"BLOCK_M": 64, "BLOCK_N": 32}
    grid = atomic_backward.atomic_grid(b, c, meta)
    assert grid[1] <= max_yz
    out = torch.full((grid[0] * grid[1], 2), -1, dtype=torch.int32, device=DEVICE)
    order_probe_kernel[grid](out, b, BLOCK_M=meta["BLOCK_M"])
    row_tiles, class_tiles = -(-b // meta["BLOCK_M"]), -(-c // meta["BLOCK_N"])
    launched = [tuple(t) for t in out.cpu().tolist() if t[1] < class_tiles]
    assert sorted(launched) == [(m, n) for m in range(row_tiles) for n in range(class_tiles)]
    for start in range(len(launched) - row_tiles + 1):
        window = [m for m, _ in launched[start : start + row_tiles]]
        assert len(set(window)) == row_tiles, (start, window)


# ---------------------------------------------------------------- device guard

def test_device_guard_selects_the_tensors_device(tb):
    guard = tb.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(tb.device_guard(torch.device("cpu")), torch.cuda.device)


def test_every_launch_runs_under_the_device_guard(tb, strategy, monkeypatch):
    """A PartialFC shard on cuda:1 without set_device must launch on cuda:1:
    every function of the backend that launches a kernel enters the guard for
    its tensors' device first."""
    from margin_kernels.backends import triton_kernels as K

    state = {"inside": 0, "devices": []}

    class Recorder:
        def __init__(self, device):
            state["devices"].append(torch.device(device))

        def __enter__(self):
            state["inside"] += 1

        def __exit__(self, *exc):
            state["inside"] -= 1

    unguarded = []
    for name in ("row_inv_norm_kernel", "lse_forward_kernel", "lse_backward_kernel", "lse_backward_dw_kernel",
                 "lse_backward_dx_kernel", "project_rows_kernel"):
        kernel = getattr(K, name)
        original = kernel.__getitem__

        def getitem(grid, original=original, name=name):
            if not state["inside"]:
                unguarded.append(name)
            return original(grid)

        monkeypatch.setattr(kernel, "__getitem__", getitem, raising=False)
    monkeypatch.setattr(tb, "device_guard", Recorder)
    # __getitem__ is looked up on the type: route the type's through the instance's
    for cls in {type(getattr(K, n)) for n in ("lse_forward_kernel", "row_inv_norm_kernel")}:
        monkeypatch.setattr(cls, "__getitem__", lambda self, grid: self.__dict__["__getitem__"](grid))
    x, w, y = make_problem(9, 16, 70, seed=4)
    x, w = x.to(DEVICE).requires_grad_(True), w.to(DEVICE).requires_grad_(True)
    mk.margin_cross_entropy(x, w, y.to(DEVICE), mk.ArcFace(), backend="triton").backward()
    assert not unguarded
    assert state["devices"] and all(dev == x.device for dev in state["devices"])


# ---------------------------------------------------------------- fp16 tiles

def test_fp16_gradient_tile_stays_finite_under_a_loss_scale(tb, strategy):
    """Under GradScaler the upstream gradient is 2^16; times s = 64 and
    1/||w|| ~ 4 the gradient tile reaches ~1e7, far past fp16's 65,504. Scaled
    per row / column before the fp16 cast, the products stay finite and match
    a float64 product."""
    from margin_kernels.margins import target_logit

    b, d, c, s = 4, 32, 90, 64.0
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(c, d, generator=g) * 0.05).half()  # small norms: 1/||w|| ~ 4 scales the tile up
    x_hat = torch.nn.functional.normalize(torch.randn(b, d, generator=g))
    y = torch.tensor([3, 10, 20, 30])
    w[y + 1] = (x_hat * 0.05 * d**0.5).half()  # a rival along x: its p is near 1
    x_hat = torch.nn.functional.normalize(x_hat.half().float())
    w_inv = 1.0 / w.float().norm(dim=1)
    cos_y = (x_hat * w.float()[y] * w_inv[y, None]).sum(1)
    t, _ = target_logit(cos_y, mk.ArcFace().row_margins(b), overflow="none")
    dev = lambda v: v.to(DEVICE)  # noqa: E731
    opts = mk.KernelOptions(workspace_bytes=2**26, triton_backward=strategy).resolved()
    w_inv_k = tb.row_inv_norms(dev(w))
    lse = tb.lse_forward(dev(x_hat), dev(w), w_inv_k, dev(y), dev(s * t), scale=s, options=opts)
    grad = torch.full((b,), 2.0**16)
    dx, dw = tb.lse_backward(dev(x_hat), dev(w), w_inv_k, dev(y), lse, dev(grad), scale=s, options=opts)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()

    # float64 oracle of the tile products (target columns left out), from the same fp16 operands
    x16, w64 = x_hat.half().double(), w.double()
    inv = 1.0 / w64.norm(dim=1)
    z = s * (x16 @ w64.t()) * inv
    z[torch.arange(b), y] = s * t.double()
    e = 2.0**16 * s * torch.softmax(z, dim=1) * inv
    e[torch.arange(b), y] = 0.0
    assert e.abs().max() > 4 * 65504  # past fp16's range
    assert rel_err(dx.cpu(), e @ w64) < 2e-3
    g_w = e.t() @ x16
    dw_ref = g_w - w64 * (inv**2 * (w64 * g_w).sum(1))[:, None]
    assert rel_err(dw.double().cpu(), dw_ref) < 2e-3


# ---------------------------------------------------------------- autotuning

def test_autotune_key_is_bucketed(tb, monkeypatch):
    """Tuned once per power-of-two B and C: the last batch or an eval batch must
    not retune (each trial of the atomic backward zeroes a [C, D] buffer)."""
    from margin_kernels.backends import triton_kernels as K

    assert K.autotune_bucket(1) == 1 and K.autotune_bucket(37) == 64 and K.autotune_bucket(64) == 64
    assert K.autotune_bucket(1_000_001) == 2**20
    # the shapes, bucketed, then flags fixed per model (variants: test_the_autotune_key_holds_every_variant_flag)
    for kernel in (K.lse_forward_kernel, K.lse_backward_kernel, K.lse_backward_dw_kernel, K.lse_backward_dx_kernel):
        assert list(kernel.keys)[:3] == ["B_BUCKET", "C_BUCKET", "D"]
        assert not {"B", "C"} & set(kernel.keys)
    seen = []
    original = K.lse_forward_kernel.run

    def spy(*args, **kwargs):
        names = K.lse_forward_kernel.arg_names
        seen.append(tuple(args[names.index(n)] for n in ("B_BUCKET", "C_BUCKET", "D")))
        return original(*args, **kwargs)

    monkeypatch.setattr(K.lse_forward_kernel, "run", spy)
    for b in (37, 40, 64):
        x, w, y = make_problem(b, 16, 100, seed=b)
        with torch.no_grad():
            mk.margin_cross_entropy(x.to(DEVICE), w.to(DEVICE), y.to(DEVICE), mk.ArcFace(), backend="triton")
    assert seen == [(64, 128, 16)] * 3


H200_SHARED_MEMORY = 232_448  # bytes a block may opt into on sm_90


def test_subcenters_tune_over_their_own_tiles(monkeypatch):
    """On a GPU, SUBCENTERS > 1 prunes the candidates to the smaller tiles that
    do not spill (and SUBCENTERS = 1 to the plain ones)."""
    from margin_kernels.backends.triton_kernels import autotune as A

    monkeypatch.setattr(A, "_device_shared_memory", lambda: H200_SHARED_MEMORY)
    bf16 = {"W": torch.empty(1, dtype=torch.bfloat16)}
    for kind in ("fwd", "bwd"):
        spec = A.autotune_args(kind, interpret=False, subcenters=True)
        prune = spec["prune_configs_by"]["early_config_prune"]
        configs = spec["configs"]
        plain = [c.kwargs for c in prune(configs, bf16, SUBCENTERS=1)]
        sub = [c.kwargs for c in prune(configs, bf16, SUBCENTERS=3)]
        assert plain == [c.kwargs for c in A.candidates(kind, interpret=False)]
        assert sub == [c.kwargs for c in A.candidates(kind, interpret=False, subcenters=True)]
        assert max(c["BLOCK_M"] * c["BLOCK_N"] for c in sub) < max(c["BLOCK_M"] * c["BLOCK_N"] for c in plain)


def test_configs_that_cannot_fit_are_pruned_before_they_compile(monkeypatch):
    """A 128 x 256 x 64, 3-stage fp32 forward needs 288 KiB of shared memory:
    dropped before compiling on a 227 KiB device; in bf16 (144 KiB) it stays."""
    from margin_kernels.backends.triton_kernels import autotune as A

    big = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}
    assert A.shared_memory_bytes("fwd", big, 3, 4) == 288 * 1024
    assert A.shared_memory_bytes("fwd", big, 3, 2) == 144 * 1024
    monkeypatch.setattr(A, "_device_shared_memory", lambda: H200_SHARED_MEMORY)
    spec = A.autotune_args("fwd", interpret=False, subcenters=True)
    prune = spec["prune_configs_by"]["early_config_prune"]
    for dtype, kept in ((torch.float32, False), (torch.bfloat16, True)):
        left = [c.kwargs for c in prune(spec["configs"], {"W": torch.empty(1, dtype=dtype)}, SUBCENTERS=1)]
        assert (big in left) == kept and left
    # upcast bf16 operands are fp32 tiles
    left = [c.kwargs for c in prune(spec["configs"], {"W": torch.empty(1, dtype=torch.bfloat16)}, SUBCENTERS=1,
                                    UPCAST=True)]
    assert big not in left
    # every kept config of every kernel fits by the estimate
    for kind in ("fwd", "bwd", "bwd_dw", "bwd_dx"):
        for config in A.candidates(kind, interpret=False):
            assert A.fits(kind, config, 2, H200_SHARED_MEMORY), (kind, config)


def test_the_autotune_key_holds_every_variant_flag():
    """A config tuned without hard negatives, without dW or with fast fp32 dots
    is not reused for the other variant."""
    from margin_kernels.backends import triton_kernels as K

    kernels = {"fwd": K.lse_forward_kernel, "bwd": K.lse_backward_kernel, "bwd_dw": K.lse_backward_dw_kernel,
               "bwd_dx": K.lse_backward_dx_kernel}
    for kind, kernel in kernels.items():
        constexprs = [n for n in kernel.arg_names if n.isupper() and n not in ("B", "C", "D") and
                      not n.startswith("BLOCK") and n not in ("X", "W", "W_INV", "LABELS", "TARGET", "CLASS_INDEX",
                                                               "HARD", "PART_MAX", "PART_SUM", "LSE", "GRAD", "DX",
                                                               "DW", "B_BUCKET", "C_BUCKET")]
        assert set(constexprs) <= set(kernel.keys), (kind, set(constexprs) - set(kernel.keys))
        assert {"B_BUCKET", "C_BUCKET", "D"} <= set(kernel.keys)



def test_a_candidate_that_fails_is_skipped_while_the_device_stays_usable(monkeypatch):
    """Triton's autotuner catches only three kinds of error per candidate; any
    other (an LLVM or driver error) would abort the call. Ours times such a
    candidate as infinite and warns, unless the device is no longer usable."""
    from margin_kernels.backends.triton_kernels import autotune as A

    monkeypatch.setattr(A, "_benchmarker", lambda: lambda call, quantiles: call() or [1.0] * len(quantiles))

    def broken():
        raise RuntimeError("LLVM ERROR: failed to legalize operation")

    monkeypatch.setattr(A, "device_usable", lambda: True)
    assert A.bench_or_skip("fwd", lambda: None, (0.5, 0.2, 0.8)) == [1.0, 1.0, 1.0]
    with pytest.warns(RuntimeWarning, match="fwd kernel failed and is skipped: RuntimeError: LLVM ERROR"):
        assert A.bench_or_skip("fwd", broken, (0.5, 0.2, 0.8)) == [float("inf")] * 3
    monkeypatch.setattr(A, "device_usable", lambda: False)
    with pytest.raises(RuntimeError, match="LLVM ERROR"):
        A.bench_or_skip("fwd", broken, (0.5, 0.2, 0.8))


def test_every_tuned_kernel_benchmarks_through_the_tolerant_timer():
    """The autotuners Triton builds from our arguments time candidates with
    ``bench_or_skip`` (Triton's ``do_bench`` hook), for each kernel kind."""
    from margin_kernels.backends.triton_kernels import autotune as A

    @triton.jit
    def probe(X, B_BUCKET, C_BUCKET, D, HAS_INDEX: tl.constexpr, HAS_HARD: tl.constexpr, SUBCENTERS: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr, SCALE: tl.constexpr, WITH_DW: tl.constexpr):
        pass

    for kind in ("fwd", "bwd", "bwd_dw", "bwd_dx"):
        tuner = triton.autotune(**A.autotune_args(kind, interpret=False, subcenters=kind in ("fwd", "bwd")))(probe)
        assert tuner.do_bench.func is A.bench_or_skip and tuner.do_bench.args == (kind,)

# ---------------------------------------------------------------- half weights

def test_half_weight_gradient_never_holds_an_fp32_copy_of_w(tb, strategy):
    """bf16 / fp16 weights: dW is accumulated in an fp32 scratch of at most the
    workspace, class chunk by class chunk, never in an fp32 [C, D]."""
    from torch.utils._python_dispatch import TorchDispatchMode

    b, d, c = 21, 24, 900
    workspace = 256 * d * 4  # 256 classes a chunk: four chunks, the last one partial
    allocs = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32:
                allocs.append(out.numel())
            return out

    x, w, y = make_problem(b, d, c, dtype=torch.bfloat16, seed=5, ignore=(2,))
    xt, wt = x.to(DEVICE, copy=True).requires_grad_(True), w.to(DEVICE, copy=True).requires_grad_(True)
    with Allocations():
        loss = mk.margin_cross_entropy(xt, wt, y.to(DEVICE), mk.ArcFace(), backend="triton", workspace_bytes=workspace)
        loss.backward()
    assert max(allocs) < c * d, max(allocs)
    assert wt.grad.dtype == torch.bfloat16
    full = w.float().requires_grad_(True)
    xf = x.float().requires_grad_(True)
    mk.margin_cross_entropy(xf, full, y, mk.ArcFace(), backend="reference").backward()
    assert rel_err(wt.grad.float().cpu(), full.grad) < 3e-2
    assert rel_err(xt.grad.float().cpu(), xf.grad) < 3e-2
