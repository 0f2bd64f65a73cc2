"""Every registered backend matches 'reference', forward and backward, on random shapes and settings."""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from convplus import backends, functional
from convplus.neighborhood import Neighborhood

from .conftest import MODULES, forward_backward, rel_err


def _runnable_backends() -> list[str]:
    """Registered backends other than 'reference' that can run on this machine (CPU)."""
    names = []
    for name in backends.BACKENDS:
        try:
            backends.resolve(name, (4, 4), torch.device("cpu"), Neighborhood.of((3, 3), (1, 1)))
        except ValueError:
            continue
        if name != "reference":
            names.append(name)
    return names


FAST_BACKENDS = _runnable_backends()


@st.composite
def configs(draw):
    n = draw(st.integers(1, 3))
    max_side = {1: 9, 2: 6, 3: 4}[n]
    grid = tuple(draw(st.lists(st.integers(1, max_side), min_size=n, max_size=n)))
    heads = draw(st.sampled_from([1, 2]))
    head_dim = draw(st.integers(1, 3))
    proj = draw(st.booleans())
    channels = heads * head_dim if not proj else draw(st.sampled_from([2, 4]))
    kernel = draw(st.sampled_from([1, 3, 5]))
    return {
        "n": n,
        "grid": grid,
        "batch": draw(st.integers(1, 2)),
        "kwargs": {
            "in_channels": channels,
            "out_channels": channels if not proj else draw(st.integers(1, 5)),
            "heads": heads,
            "head_dim": head_dim,
            "kernel_size": kernel,
            "window": draw(st.sampled_from([1, 3, 5, None, kernel])),
            "dilation": draw(st.sampled_from([1, 2])),
            "score": draw(st.sampled_from(["direct", "qk"])),
            "pos": draw(st.sampled_from(["sincos", "learned", "none"])),
            "pos_size": draw(st.integers(1, 5)),
            "proj": proj,
            "bias": draw(st.booleans()),
            "convolution": draw(st.booleans()),
            "qk_dim": draw(st.sampled_from([None, 2])),
        },
    }


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs())
def test_backend_matches_reference(backend, config):
    kwargs = config["kwargs"]
    if kwargs["score"] == "direct" and kwargs["in_channels"] % kwargs["heads"]:
        kwargs["score"] = "qk"
    if backends.BACKENDS[backend].needs_window and kwargs["window"] is None:
        kwargs["window"] = 5
    module = MODULES[config["n"]](**kwargs, dtype=torch.float64)
    with torch.no_grad():  # random, non-trivial gains and kernels
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(config["batch"], kwargs["in_channels"], *config["grid"], dtype=torch.float64)
    module.backend = "reference"
    y_ref, g_ref = forward_backward(module, x)
    module.backend = backend
    y, g = forward_backward(module, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
@pytest.mark.parametrize(
    ("n", "grid", "kwargs"),
    [
        (1, (5,), {"kernel_size": 3, "window": 3, "score": "direct", "pos": "learned", "pos_size": 4}),
        (2, (3, 4), {"kernel_size": 3, "window": 3, "dilation": 2, "score": "qk", "pos": "sincos"}),
        (3, (2, 2, 3), {"kernel_size": 1, "window": 3, "score": "direct", "pos": "none"}),
    ],
)
def test_gradcheck(backend, n, grid, kwargs):
    module = MODULES[n](4, 3, heads=2, head_dim=2, dtype=torch.float64, **kwargs)
    names, params = zip(*module.named_parameters(), strict=True)
    x = torch.randn(1, 4, *grid, dtype=torch.float64, requires_grad=True)
    module.backend = backend

    def fn(x, *ps):
        return torch.func.functional_call(module, dict(zip(names, ps, strict=True)), (x,))

    inputs = (x, *[p.detach().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_auto_picks_global_when_window_covers_grid_and_the_cpu_kernel_otherwise():
    cpu = torch.device("cpu")
    assert backends.select((5, 5), cpu, Neighborhood.of(None, (1, 1))) == "global"
    assert backends.select((3, 3), cpu, Neighborhood.of((7, 7), (1, 1))) == "global"
    assert backends.select((20, 20), cpu, Neighborhood.of((7, 7), (1, 1))) == "cpu"
    assert backends.select((20, 20), torch.device("meta"), Neighborhood.of((7, 7), (1, 1))) == "local"


def _recording_kernel(monkeypatch) -> list[str]:
    """Makes the 'cpu' backend's kernel record the name of every entry point it runs; returns that record."""
    from convplus.backends import cpu

    kernels, calls = cpu.extension(), []

    class Recording:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(kernels, name)

    monkeypatch.setattr(cpu, "extension", Recording)
    return calls


UNIT_ROUNDOFF = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the C++ kernel does not build here")
@pytest.mark.parametrize("score", ["direct", "qk"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_backend_computes_half_precision_in_float32(monkeypatch, dtype, score):
    """Half-precision q, k, v (autocast's, beside float32 parameters) run the kernel in float32: the output is
    'reference' in float32 on the same rounded inputs, rounded once to the input dtype, and so are the
    gradients, each in its input's dtype."""
    from convplus.backends import cpu

    calls = _recording_kernel(monkeypatch)
    hood = Neighborhood.of((3, 3), (1, 1), (True, False))
    x = torch.randn(2, 8, 6, 7).to(dtype)
    inputs = {  # the 'direct' score reads x and pos in float32 (autocast leaves them), 'qk' half-precision q, k
        "x": x.float(),
        "pos": torch.randn(8, 6, 7),
        "temperature": torch.tensor([2.0, 0.5]),
        "q": torch.randn(2, 2, 4, 6, 7).to(dtype),
        "k": torch.randn(2, 2, 4, 6, 7).to(dtype),
        "v": torch.randn(2, 2, 3, 6, 7).to(dtype),
        "kernel": torch.randn(2, 3, 3, 3),
        "gain": torch.tensor([0.7, 1.3]),
        "bias": torch.randn(2, 3),
    }
    upstream = torch.randn(2, 2, 3, 6, 7).to(dtype)
    results = []
    for run_in_float32 in (False, True):
        t = {name: value.detach().float() if run_in_float32 else value.detach() for name, value in inputs.items()}
        for value in t.values():
            value.requires_grad_(True)
        if score == "direct":
            used = ("x", "pos", "temperature", "v", "kernel", "gain", "bias")
            if run_in_float32:
                q, k = functional.score_features(t["x"], 2, "direct", t["pos"], t["temperature"])
                z = backends.BACKENDS["reference"].mix(q, k, t["v"], t["kernel"], t["gain"], hood, t["bias"])
            else:
                z = cpu.direct_mix(t["x"], t["pos"], t["temperature"], t["v"], t["kernel"], t["gain"], hood, t["bias"])
        else:
            used = ("q", "k", "v", "kernel", "gain", "bias")
            mix = backends.BACKENDS["reference"].mix if run_in_float32 else cpu.mix
            z = mix(t["q"], t["k"], t["v"], t["kernel"], t["gain"], hood, t["bias"])
        z.backward(upstream.to(z.dtype))
        results.append({"z": z.detach(), **{name: t[name].grad for name in used}})
    got, expected = results
    assert got["z"].dtype == dtype and all(got[name].dtype == inputs[name].dtype for name in got if name != "z")
    assert calls.count("window_mix_backward") == 1  # the kernel ran, forward and backward: no fallback
    for name in got:
        assert rel_err(got[name].float(), expected[name]) <= 2 * UNIT_ROUNDOFF[dtype], name


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the C++ kernel does not build here")
@pytest.mark.parametrize("score", ["direct", "qk"])
def test_bfloat16_autocast_runs_the_cpu_kernel(monkeypatch, score):
    """Under CPU autocast to bfloat16 (mixed-precision training) a layer fed by a convolution gets bfloat16 features
    and, without biases, bfloat16 projections: 'auto' runs the fused kernel on them, forward and backward, within
    bfloat16 rounding of the float32 network."""
    calls = _recording_kernel(monkeypatch)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 1), MODULES[2](8, heads=2, kernel_size=3, score=score, bias=False)
    )
    x = torch.randn(2, 3, 9, 10, requires_grad=True)
    expected = model(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    (grad,) = torch.autograd.grad(y.float().sum(), x)
    assert y.dtype == torch.bfloat16  # half precision reached the layer and left it
    forward = "direct_window_mix_forward" if score == "direct" else "window_mix_forward"
    assert {forward, "window_mix_backward"} <= set(calls)
    assert rel_err(y.float(), expected) <= 5e-2 and rel_err(grad, expected_grad) <= 5e-2


FALLBACK_REASONS = {"cpu": "the C++ kernel could not be built (OSError: no compiler)", "triton": "no triton here"}


@pytest.fixture
def fused_unavailable(monkeypatch):
    """Makes the fused backends ('cpu', 'triton') unavailable, with the reasons above, and forgets which
    fallbacks were warned about."""
    for name, reason in FALLBACK_REASONS.items():
        record = dataclasses.replace(backends.BACKENDS[name], unavailable_reason=lambda device, r=reason: r)
        monkeypatch.setitem(backends.BACKENDS, name, record)
    monkeypatch.setattr(backends, "_warned", set())


def _fallback_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, backends.BackendFallbackWarning)]


@pytest.mark.usefixtures("fused_unavailable")
def test_auto_falls_back_to_local_with_one_warning_naming_the_reason_and_the_cost():
    module = MODULES[2](8, heads=2, kernel_size=3)
    x = torch.randn(1, 8, 9, 9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = module(x)
        module(x)
        functional.conv_plus(
            x, heads=2, kernel=None, gain=module.gain, window=(5, 5), dilation=(1, 1), temperature=module.temperature
        )
    (message,) = _fallback_warnings(caught)
    assert FALLBACK_REASONS["cpu"] in message and "PyTorch loop ('local'), about 20x slower" in message
    module.backend = "local"
    torch.testing.assert_close(y, module(x), rtol=0, atol=0)  # what ran was the 'local' loop
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.select((20, 20), torch.device("cuda"), Neighborhood.of((7, 7), (1, 1))) == "local"
        assert backends.select((20, 20), torch.device("cuda"), Neighborhood.of((7, 7), (1, 1))) == "local"
    (message,) = _fallback_warnings(caught)
    assert FALLBACK_REASONS["triton"] in message and "Triton" in message


@pytest.mark.usefixtures("fused_unavailable")
def test_asking_for_an_unavailable_fused_backend_raises_the_reason():
    module = MODULES[2](8, heads=2, kernel_size=3, backend="cpu")
    with pytest.raises(ValueError, match=re.escape(f"backend 'cpu' cannot run here: {FALLBACK_REASONS['cpu']}")):
        module(torch.randn(1, 8, 9, 9))
    with pytest.raises(ValueError, match=re.escape(f"backend 'triton' cannot run here: {FALLBACK_REASONS['triton']}")):
        backends.resolve("triton", (9, 9), torch.device("cuda"), Neighborhood.of((3, 3), (1, 1)))


def test_a_failed_kernel_build_is_tried_once_per_process(monkeypatch):
    from convplus.backends import cpu

    attempts = []

    def failing_build():
        attempts.append(1)
        raise OSError("no compiler")

    monkeypatch.setattr(cpu.cpu_build, "MODULE", "convplus.backends._not_compiled")
    monkeypatch.setattr(cpu, "_build_just_in_time", failing_build)
    cpu._load.cache_clear()
    try:
        for _ in range(3):
            assert cpu.unavailable_reason(torch.device("cpu")) == FALLBACK_REASONS["cpu"]
        with pytest.raises(RuntimeError, match="no compiler"):
            cpu.extension()
    finally:
        cpu._load.cache_clear()  # later tests load the real kernel
    assert attempts == [1]


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the C++ kernel does not build here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("n", "grid", "kwargs"),
    [  # rows wider than one register tile (64 floats / 32 doubles), a partial last tile, halos of 2 and 6; rows of
        # whole 64-byte vectors followed by a 32-byte one (37, 40, 70, 150 columns)
        (1, (150,), {"kernel_size": 5, "window": 5}),
        (2, (3, 37), {"kernel_size": 3, "window": 7, "dilation": 2}),
        (3, (2, 3, 70), {"kernel_size": 3, "window": 3}),
        (2, (9, 40), {"kernel_size": 7, "window": 3}),  # the kernel reaches past the window: not fused
        (1, (70,), {"kernel_size": 5, "window": 11}),  # 11 offsets on one key row: more than one group of 8
        (2, (5, 20), {"kernel_size": 3, "window": 3, "channels": 24}),  # 12 channels a head: two blocks of 6
        (2, (4, 9), {"kernel_size": 3, "window": 3, "channels": 52}),  # 26 channels a head: blocks of 9, 9, 8
        (2, (11, 19), {"kernel_size": 5, "window": 5, "channels": 32}),  # channels-last rows in 8x8 blocks + rest
        (2, (9, 14), {"kernel_size": 5, "window": 5, "border": "shift"}),  # windows not symmetric at the borders
    ],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_cpu_kernel_matches_local_on_wide_rows(dtype, n, grid, kwargs, channels_last):
    """Against 'local' run in float64 (float32 is held to float32's accuracy on sums of thousands of terms, some
    cancelling, not to another float32 rounding of them). Also on channels-last input (channels innermost, 1-d
    included), which the kernel reads without a copy; in 2-d and 3-d the output and the input's gradient keep
    that layout."""
    kwargs = dict(kwargs)
    channels = kwargs.pop("channels", 8)
    module = MODULES[n](channels, heads=2, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, channels, *grid, dtype=dtype)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    module.backend = "cpu"
    y_cpu, g_cpu = forward_backward(module, x)
    module.backend = "local"
    y_local, g_local = forward_backward(module.double(), x.double())
    if channels_last and n > 1:  # a 1-d (B, C, L) tensor has no channels-last memory format to keep
        assert y_cpu.stride() == x.stride() and g_cpu["x"].stride() == x.stride()
    limit = 1e-4 if dtype == torch.float32 else 1e-11
    assert rel_err(y_cpu, y_local) < limit
    for name in g_local:
        assert rel_err(g_cpu[name], g_local[name]) < limit, name


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the C++ kernel does not build here")
@pytest.mark.parametrize("with_pos", [True, False])
@pytest.mark.parametrize("kernel_size", [5, 9])  # the conv term fused, and run apart (past the 5x5 window)
def test_direct_score_inside_the_kernel_matches_the_pytorch_features(with_pos, kernel_size):
    from convplus.backends import cpu

    x = torch.randn(2, 6, 7, 40, dtype=torch.float64)  # rows wider than a register tile
    x[0, :3, 1, 2] = 0  # a zero feature vector of head 0: the clamped norm
    pos = torch.randn(6, 7, 40, dtype=torch.float64) if with_pos else None
    if with_pos:
        pos[:3, 1, 2] = 0
    temperature = torch.tensor([3.0, 0.5], dtype=torch.float64)
    kernel = torch.randn(2, 3, kernel_size, kernel_size, dtype=torch.float64)
    gain = torch.tensor([0.7, -1.3], dtype=torch.float64)
    results = []
    for inside in (False, True):
        inputs = [t.clone().requires_grad_(True) for t in (x, temperature, kernel, gain, *([pos] if with_pos else []))]
        xi, tau, r, g = inputs[:4]
        p = inputs[4] if with_pos else None
        v = functional.values(xi, 2)
        if inside:
            z = cpu.direct_mix(xi, p, tau, v, r, g, Neighborhood.of((5, 5), (1, 1)))
        else:
            q, k = functional.score_features(xi, 2, "direct", p, tau)
            z = cpu.mix(q, k, v, r, g, Neighborhood.of((5, 5), (1, 1)))
        z.backward(torch.linspace(-1, 1, z.numel(), dtype=z.dtype).view_as(z))
        results.append([z.detach(), *[t.grad for t in inputs]])
    for inside_value, value in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(inside_value, value, rtol=1e-10, atol=1e-12)


def _with_threads(counts: tuple[int, ...], run: Callable[[], object]) -> list:
    """run()'s result with each of these thread counts, the process's count restored after."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in counts:
            torch.set_num_threads(count)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    return results


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the C++ kernel does not build here")
@pytest.mark.parametrize("score", ["direct", "qk"])
@pytest.mark.parametrize(
    ("grid", "kwargs"),
    [((13, 20), {}), ((3, 5, 12), {}), ((9, 21), {"dilation": 2}), ((9, 11), {"border": "shift"}), ((40,), {})],
)
@pytest.mark.parametrize("batch", [4, 1])
def test_cpu_kernel_does_not_depend_on_the_thread_count(score, grid, kwargs, batch):
    """With 1 and 3 threads. The forward bit for bit: a thread's first rows compute the 'direct' score's mirrored
    offsets themselves, later rows read them back from the rows that computed s(j, i), and the two must agree
    exactly (3 threads split the rows inside a slice). The backward: 1 thread runs both passes slice by slice
    (8 slices), 3 threads each pass over all rows (fewer than 4 slices a thread); the input's gradient bit for bit,
    the parameters' (sums over threads' partial sums, in another order) to rounding. A single image's rows are
    cut into runs among the threads (channels-last here: the threads write disjoint rows of it). The forward takes
    each row's heads in turn and writes them out together, so 3 threads also start and end inside a row's heads."""
    layer = MODULES[len(grid)](8, heads=2, kernel_size=5, score=score, backend="cpu", **kwargs)
    x = torch.randn(batch, 8, *grid)
    if batch == 1 and len(grid) > 1:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    (y_one, grads_one), (y_three, grads_three) = _with_threads((1, 3), lambda: forward_backward(layer, x))
    assert torch.equal(y_one, y_three)
    if batch > 1:
        assert torch.equal(grads_one["x"], grads_three["x"])
    # A single image: PyTorch's own reductions (projections, bias) split another way too, and the kernel's partial
    # sums of the taps' gradients are over other runs of rows.
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if batch > 1 else {"rtol": 1e-4, "atol": 1e-5}
    for name, grad in grads_one.items():
        torch.testing.assert_close(grads_three[name], grad, **tolerance)


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the C++ kernel does not build here")
@pytest.mark.parametrize(("score", "scale"), [("direct", 100.0), ("direct", 64.0), ("qk", 60.0)])
def test_cpu_kernel_softmax_does_not_overflow_on_large_scores(score, scale):
    """float32 scores past e^x's range (88): the 'direct' score at the module's temperature cap (100) and at
    64, the largest |tau| for which the kernel skips subtracting the scores' max; 'qk' scores, which have no
    bound, scaled up. Output and gradients stay finite and equal reference's."""
    layer = MODULES[2](8, heads=2, kernel_size=3, window=3, score=score)
    with torch.no_grad():
        if score == "direct":
            layer.log_temperature.fill_(math.log(scale))
        else:
            layer.query_weight.mul_(scale)
    x = torch.randn(2, 8, 6, 9)
    results = {}
    for backend in ("reference", "cpu"):
        layer.backend = backend
        results[backend] = forward_backward(layer, x)
    (y_ref, g_ref), (y_cpu, g_cpu) = results["reference"], results["cpu"]
    assert torch.isfinite(y_cpu).all() and rel_err(y_cpu, y_ref) < 1e-4
    for name, grad in g_ref.items():
        assert torch.isfinite(g_cpu[name]).all() and rel_err(g_cpu[name], grad) < 1e-3, name


class _RecordingOps(TorchDispatchMode):
    """Records the name of every op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the C++ kernel does not build here")
@pytest.mark.parametrize("score", ["direct", "qk"])
def test_cpu_kernel_backward_fills_no_zero_gradient_for_the_probabilities(score):
    """The kept probabilities are an output without a gradient; autograd must not fill one with zeros for the
    backward (it is as large as the scores: W values per position and head)."""
    layer = MODULES[2](8, heads=2, kernel_size=5, score=score, backend="cpu")
    y = layer(torch.randn(2, 8, 9, 11, requires_grad=True))
    with _RecordingOps() as recorded:
        y.sum().backward()
    assert any(name.startswith("convplus::") for name in recorded.names)
    assert not [name for name in recorded.names if "zero" in name or "fill" in name]


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the C++ kernel does not build here")
def test_cpu_kernel_keeps_probabilities_only_when_a_gradient_can_follow(monkeypatch):
    from convplus.backends import cpu

    kernels, kept = cpu.extension(), []

    class Recording:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def window_mix_forward(self, *args):
            kept.append(("qk", args[-1]))
            return kernels.window_mix_forward(*args)

        def direct_window_mix_forward(self, *args):
            kept.append(("direct", args[-1]))
            return kernels.direct_window_mix_forward(*args)

    monkeypatch.setattr(cpu, "extension", Recording)
    for score in ("direct", "qk"):
        module = MODULES[2](8, heads=2, kernel_size=5, score=score, backend="cpu")  # parameters require grad
        x = torch.randn(2, 8, 9, 10)
        with torch.no_grad():
            inference = module(x)
        training = module(x)
        training.sum().backward()
        assert kept == [(score, False), (score, True)]
        torch.testing.assert_close(inference, training.detach(), rtol=0, atol=0)
        kept.clear()


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the C++ kernel does not build here")
@pytest.mark.parametrize("score", ["direct", "qk"])
def test_cpu_kernel_phase_clock_times_every_phase_of_both_passes(score):
    """Inside the block every phase of the forward and backward passes gets time (the keys' phase only with the
    'direct' score, which computes them in the pass), no more than the threads can have spent; the results are
    those of an untimed call; a new block starts from zero and the clock stops with its block."""
    from convplus.backends import cpu

    layer = MODULES[2](8, heads=2, kernel_size=5, score=score, backend="cpu")
    x = torch.randn(2, 8, 9, 11)
    untimed = forward_backward(layer, x)
    start = time.perf_counter()
    with cpu.phase_clock() as phases:
        timed = forward_backward(layer, x)
    elapsed = time.perf_counter() - start
    assert torch.equal(timed[0], untimed[0])
    assert all(torch.equal(timed[1][name], grad) for name, grad in untimed[1].items())
    expected = {name for name in phases if score == "direct" or not name.startswith("forward: keys")}
    assert {name for name, seconds in phases.items() if seconds > 0} == expected
    assert sum(phases.values()) <= elapsed * torch.get_num_threads()
    forward_backward(layer, x)  # after the block: not counted
    assert dict(cpu.extension().phase_times()) == phases
    with cpu.phase_clock() as empty:
        pass
    assert set(empty.values()) == {0.0}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_global_backend_runs_sdpa_fused_kernel_and_returns_z_in_the_layout_of_v(channels_last):
    """On a grid larger than the explicit products take (13x12 = 156 positions), SDPA's fused CPU kernel (its
    math path is several times slower) takes the rows of q, k, v whatever their layout, and z comes back in v's
    layout: a channels-last input needs no contiguous copy ('any_layout')."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from convplus.backends import global_attention, reference

    assert global_attention.EXPLICIT_PRODUCTS_MAX_POSITIONS < 13 * 12
    x = torch.randn(2, 8, 13, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    q, k, v = (x.view(2, 2, 4, 13, 12) * scale for scale in (1.0, 0.5, 2.0))  # each in x's layout
    hood = Neighborhood.of(None, (1, 1))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises where SDPA cannot run it on these inputs
        z = global_attention.attend(q, k, v, hood)
    assert z.stride() == v.stride()
    torch.testing.assert_close(z, reference.attend(q, k, v, hood))
    assert backends.BACKENDS["global"].any_layout


@pytest.mark.parametrize(
    ("grid", "layout"), [((6, 7), torch.channels_last), ((3, 6, 7), torch.channels_last_3d)], ids=["2d", "3d"]
)
def test_convolution_term_of_a_channels_last_image_of_batch_one_is_channels_last(grid, layout):
    """A channels-last image of batch 1, viewed per head as the backends view it (the view gives its batch the
    stride of the channels alone), gets its convolution term channels-last, equal to that of a contiguous copy:
    oneDNN reads the strides and would otherwise run the convolution on NCHW, about twice as slow, and return
    NCHW."""
    from convplus.backends.terms import convolution_term

    x = torch.randn(1, 8, *grid).contiguous(memory_format=layout)
    v = x.view(1, 2, 4, *grid)
    assert v.stride(0) == 8  # the channels' stride alone
    kernel, bias = torch.randn(2, 4, *(3 for _ in grid)), torch.randn(2, 4)
    hood = Neighborhood.of(None, (1,) * len(grid))
    z = convolution_term(v, kernel, hood, bias)
    assert z.stride()[1:] == v.stride()[1:]
    torch.testing.assert_close(z, convolution_term(v.contiguous(), kernel, hood, bias))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_global_backend_takes_explicit_products_on_small_cpu_grids(monkeypatch, channels_last):
    """Up to EXPLICIT_PRODUCTS_MAX_POSITIONS positions (here 12x12) the unmasked attention is two matrix products
    around a softmax, without SDPA: forward and backward as the reference's, z in v's layout; under bfloat16
    autocast the softmax runs in float32."""
    from convplus.backends import global_attention, reference

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called")

    monkeypatch.setattr(global_attention.F, "scaled_dot_product_attention", no_sdpa)
    assert global_attention.EXPLICIT_PRODUCTS_MAX_POSITIONS == 12 * 12
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    hood = Neighborhood.of(None, (1, 1))
    grads = []
    for attend in (global_attention.attend, reference.attend):
        xi = x.detach().requires_grad_(True)
        q, k, v = (xi.view(2, 2, 4, 12, 12) * scale for scale in (1.0, 0.5, 2.0))
        z = attend(q, k, v, hood)
        z.backward(torch.linspace(-1, 1, z.numel(), dtype=z.dtype).view_as(z))
        grads.append((z.detach(), xi.grad))
        if attend is global_attention.attend:
            assert z.stride() == v.stride()
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    q, k, v = (x.float().view(2, 2, 4, 12, 12) * scale for scale in (1.0, 0.5, 2.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = global_attention.attend(q, k, v, hood)
    assert z.dtype == torch.bfloat16
    torch.testing.assert_close(z.float(), reference.attend(q, k, v, hood), rtol=0.05, atol=0.05)


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the C++ kernel does not build here")
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize(
    ("with_pos", "with_kernel", "op"),
    [(True, True, "direct_global_mix"), (False, True, "direct_global_mix"), (True, False, "direct_score_features")],
)
def test_global_backend_runs_the_direct_score_in_the_cpu_kernel(monkeypatch, channels_last, with_pos, with_kernel, op):
    """The 'global' backend's ``direct_mix`` runs the C++ kernel: with a convolution term, the fused pass
    (``direct_global_mix``: keys, scores, softmax, weighted sum added to the conv term, which adds the bias);
    without one, the one-pass 'direct' score op and the products. The same z (in v's layout) and gradients as the
    'direct' score's PyTorch features through the reference backend."""
    from convplus.backends import cpu, global_attention, reference
    from convplus.backends.terms import with_convolution_term

    calls = []
    kernel_op = getattr(cpu, op)
    monkeypatch.setattr(cpu, op, lambda *args: calls.append(1) or kernel_op(*args))
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    extras = {
        "pos": torch.randn(8, 5, 6, dtype=torch.float64) if with_pos else None,
        "kernel": torch.randn(2, 4, 3, 3, dtype=torch.float64) if with_kernel else None,
        "bias": torch.randn(2, 4, dtype=torch.float64),
    }
    temperature, gain = torch.tensor([3.0, 0.5], dtype=torch.float64), torch.tensor([0.7, -1.3], dtype=torch.float64)
    hood = Neighborhood.of(None, (1, 1))
    results = []
    for fused in (True, False):
        inputs = {"x": x, "temperature": temperature, "gain": gain, **extras}
        leaves = {name: t.detach().clone().requires_grad_(True) for name, t in inputs.items() if t is not None}
        t = {name: leaves.get(name) for name in inputs}
        v = functional.values(t["x"], 2)
        if fused:
            z = global_attention.direct_mix(
                t["x"], t["pos"], t["temperature"], v, t["kernel"], t["gain"], hood, t["bias"]
            )
            assert z.stride() == v.stride()
        else:
            q, k = functional.score_features(t["x"], 2, "direct", t["pos"], t["temperature"])
            z = with_convolution_term(reference.attend)(q, k, v, t["kernel"], t["gain"], hood, t["bias"])
        z.backward(torch.linspace(-1, 1, z.numel(), dtype=z.dtype).view_as(z))
        results.append([z.detach(), *[leaf.grad for leaf in leaves.values()]])
    assert calls == [1]
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the C++ kernel does not build here")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("score", ["direct", "qk"])
@pytest.mark.parametrize(
    ("grid", "head_dim", "qk_dim"),
    [((5, 7), 9, 5), ((12, 12), 40, 16), ((1, 3), 8, 3)],  # tails of rows and vectors; the most positions; tiny
)
def test_global_mix_kernel_adds_the_attention_term_as_the_composed_products(
    dtype, channels_last, score, grid, head_dim, qk_dim
):
    """The C++ ops of the 'global' backend, z = base + g * softmax(q^T k) v^T, from q and k or with the 'direct'
    score computed in the pass: forward and backward as the reference's attention term added to base, z and the
    gradients in the layouts of base and of the inputs, on grids whose positions and channels fill register tiles
    and vectors partly."""
    from convplus.backends import cpu, reference

    torch.manual_seed(0)
    heads, batch = 2, 2
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def made(channels: int) -> torch.Tensor:
        return torch.randn(batch, channels, *grid, dtype=dtype).contiguous(memory_format=layout)

    inputs = {
        "v": made(heads * head_dim).view(batch, heads, head_dim, *grid),
        "base": made(heads * head_dim).view(batch, heads, head_dim, *grid),
        "gain": torch.tensor([0.7, -1.3], dtype=dtype),
    }
    if score == "direct":
        inputs |= {
            "x": made(heads * qk_dim),
            "pos": torch.randn(heads * qk_dim, *grid, dtype=dtype),
            "temperature": torch.tensor([8.0, 0.5], dtype=dtype),
        }
    else:
        inputs |= {name: torch.randn(batch, heads, qk_dim, *grid, dtype=dtype) for name in ("q", "k")}
    hood = Neighborhood.of(None, (1, 1))
    results = []
    for fused in (True, False):
        t = {name: tensor.detach().clone().requires_grad_(True) for name, tensor in inputs.items()}
        if score == "direct":
            q, k = functional.score_features(t["x"], heads, "direct", t["pos"], t["temperature"])
        else:
            q, k = t["q"], t["k"]
        if not fused:
            z = t["base"] + t["gain"].view(1, -1, 1, 1, 1) * reference.attend(q, k, t["v"], hood)
        elif score == "direct":
            z = cpu.direct_global_mix_of(t["x"], t["pos"], t["temperature"], t["v"], t["gain"], t["base"])
        else:
            z = cpu.global_mix_of(q, k, t["v"], t["gain"], t["base"])
        if fused:
            assert z.stride() == t["base"].stride()
        z.backward(torch.linspace(-1, 1, z.numel(), dtype=dtype).view_as(z))
        results.append([z.detach(), *[tensor.grad for tensor in t.values()]])
        if fused:
            assert all(g.stride() == tensor.stride() for g, tensor in zip(results[-1][1:], t.values(), strict=True))
    tolerance = {torch.float64: 1e-11, torch.float32: 2e-5}[dtype]
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="the C++ kernel does not build here")
@pytest.mark.parametrize(("score", "scale"), [("direct", 100.0), ("qk", 60.0)])
def test_global_kernel_is_thread_count_independent_and_finite_on_large_scores(score, scale):
    """The 'global' backend's C++ pass on a small grid with float32 scores past e^x's range (the 'direct' score at
    the module's temperature cap, 'qk' scores scaled up): with 1 and 3 threads (3 images x 2 heads: 6 slices),
    the output and the input's gradient bit for bit, the parameters' gradients (sums over threads' partial sums)
    to rounding; all finite and equal to the reference's."""
    layer = MODULES[2](8, heads=2, kernel_size=3, window=None, score=score)
    with torch.no_grad():
        if score == "direct":
            layer.log_temperature.fill_(math.log(scale))
        else:
            layer.query_weight.mul_(scale)
    x = torch.randn(3, 8, 6, 9).contiguous(memory_format=torch.channels_last)
    (y_one, grads_one), (y_three, grads_three) = _with_threads((1, 3), lambda: forward_backward(layer, x))
    assert torch.equal(y_one, y_three) and torch.equal(grads_one["x"], grads_three["x"])
    for name, grad in grads_one.items():
        torch.testing.assert_close(grads_three[name], grad, rtol=1e-5, atol=1e-6)
    layer.backend = "reference"
    y_ref, g_ref = forward_backward(layer, x)
    assert torch.isfinite(y_one).all() and rel_err(y_one, y_ref) < 1e-4
    for name, grad in g_ref.items():
        assert torch.isfinite(grads_one[name]).all() and rel_err(grads_one[name], grad) < 1e-3, name
