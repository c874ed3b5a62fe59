"""The benchmark CLI: argument errors and a tiny end-to-end run."""
import json
import os
import subprocess
import sys

import pytest

from margin_kernels import bench

from conftest import requires_cpp


def run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "margin_kernels.bench", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "0"], "--batch must be >= 1"),
        (["--classes", "100", "-5"], "--classes must all be >= 1"),
        (["--backends", "cudnn"], "unknown implementation 'cudnn'"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--size", "huge"], "invalid choice: 'huge'"),
        (["--budget-gib", "0"], "--budget-gib must be > 0"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
    ],
)
def test_argument_errors_exit_nonzero_with_a_clear_message(args, message):
    proc = run_cli(*args, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr


@pytest.mark.slow
@requires_cpp
def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("--size", "tiny", "--backends", "reference", "cpp", "gemm-floor", "cpp-gemms", "--repeat", "1",
                   "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "implementation" in proc.stdout and "reference" in proc.stdout and "cpp" in proc.stdout
    assert "cpp / cpp-gemms = " in proc.stdout and "cpp / gemm-floor = " in proc.stdout
    data = json.loads(out.read_text())
    rows = data["results"]
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    cpp_rows = [r for r in rows if r["case"]["impl"] == "cpp"]
    assert all(r["time_ms"] > 0 and r["workspace_bytes"] is not None for r in cpp_rows)


@requires_cpp
@pytest.mark.parametrize("classes", [300, 400_000], ids=["row-chunked", "class-blocked"])
def test_cpp_gemms_follow_the_path_cpp_takes(classes, monkeypatch):
    """cpp-gemms runs the GEMMs of the path cpp picks: all classes per row chunk
    for the shortcut, class blocks otherwise (patched mm records the shapes)."""
    import torch

    from margin_kernels import backends

    b = 200
    x, w = torch.randn(b, 8), torch.randn(classes, 8, requires_grad=True)
    shapes = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: shapes.append((tuple(a.shape), tuple(b.shape))) or real_mm(a, b, **kw))
    bench.make_step("cpp-gemms", "arcface", x, w, torch.zeros(b, dtype=torch.long))()
    single_pass = backends.load("cpp").prefers_single_pass(w, b, backends.KernelOptions().resolved())
    assert single_pass == (classes == 300)
    if single_pass:
        assert shapes[0] == ((b, 8), (8, classes))
    else:
        k = backends.load("cpp").block_classes(b, 8, False, backends.default_workspace_bytes())
        assert k < classes and ((b, 8), (8, k)) in shapes


def test_overheads_line_divides_by_the_bare_gemms():
    case = lambda impl: bench.Case(impl, 8, 4, 1000)  # noqa: E731
    results = [bench.Result(case("cpp"), times_ms=[3.0]), bench.Result(case("cpp-gemms"), times_ms=[2.0]),
               bench.Result(case("gemm-floor"), times_ms=[1.5])]
    text = bench.format_overheads(results)
    assert "cpp / gemm-floor = 2.00x" in text and "cpp / cpp-gemms = 1.50x" in text
    assert bench.format_overheads(results[:1]) == ""


def test_table_puts_the_baseline_and_ratios_side_by_side():
    case = lambda impl: bench.Case(impl, 8, 4, 1000)  # noqa: E731
    results = [
        bench.Result(case("reference"), times_ms=[10.0], workspace_bytes=400 * 2**20),
        bench.Result(case("cpp"), times_ms=[2.5], workspace_bytes=4 * 2**20),
        bench.Result(case("insightface"), status="oom", message="can't allocate"),
    ]
    table = bench.format_table(results)
    assert "4.00x" in table and "0.010" in table and "OOM" in table


@requires_cpp
@pytest.mark.parametrize("margin", ["adaface", "magface", "curricular", "subcenter"])
def test_feature_margin_steps_run_on_their_weights(margin):
    """Each feature margin's fused step and naive baseline run on the weight the
    worker builds (3 rows per class for sub-centers) and compute the same loss
    (the baseline is the paper's reference, with the same statistics and t),
    so their gradients agree."""
    import torch

    from margin_kernels.bench.steps import make_step, weight_rows

    grads = []
    for impl in ("reference", "cpp"):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 8, generator=g).requires_grad_(True)
        w = torch.randn(weight_rows(margin, 10), 8, generator=g).requires_grad_(True)
        y = torch.randint(0, 10, (16,), generator=g)
        make_step(impl, margin, x, w, y)()
        assert w.grad.shape == (weight_rows(margin, 10), 8)
        grads.append((x.grad, w.grad))
    if margin == "subcenter":
        assert w.shape[0] == 30
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), margin


@requires_cpp
@pytest.mark.parametrize("margin", ["arcface", "subcenter", "adaface"])
def test_warm_up_takes_both_paths(margin, monkeypatch):
    """The warm-up runs the single pass and the class-blocked path (the custom
    op, whose first call imports ~140 MiB of modules) for every margin, so that
    neither import lands in a measured peak."""
    import torch

    from margin_kernels.backends import cpp
    from margin_kernels.bench import worker

    calls = []
    for name in ("single_pass", "lse_backward"):
        real = getattr(cpp, name)
        monkeypatch.setattr(cpp, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    monkeypatch.delenv("MARGIN_KERNELS_SINGLE_PASS", raising=False)
    worker._warm_up(worker.Case("cpp", 8, 16, 100, "float32", margin, "cpu", 1, 0), torch.float32,
                    torch.device("cpu"))
    assert "single_pass" in calls and "lse_backward" in calls
    assert "MARGIN_KERNELS_SINGLE_PASS" not in os.environ


def test_the_gpu_warm_up_tunes_nothing_of_its_own(monkeypatch):
    """On a GPU the first step at the measured shape is the warm-up: a tiny
    problem would compile and tune its own autotune bucket, which no timed
    step uses. (A CUDA device object needs no GPU: nothing is made on it.)"""
    import torch

    from margin_kernels.bench import worker

    made = []
    monkeypatch.setattr(worker, "make_step", lambda *a, **k: made.append(a))  # returns None
    worker._warm_up(worker.Case("triton", 8, 16, 100, "bfloat16", "arcface", "cuda", 1, 0), torch.bfloat16,
                    torch.device("cuda"))
    assert made == []
    with pytest.raises(TypeError):  # (the fake step is not callable: on the CPU the warm-up does make one)
        worker._warm_up(worker.Case("reference", 8, 16, 100, "float32", "arcface", "cpu", 1, 0), torch.float32,
                        torch.device("cpu"))
    assert len(made) == 1
