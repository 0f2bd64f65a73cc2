"""The fused CPU kernel as torch.library custom ops: each op passes ``torch.library.opcheck`` (schema, fake
shapes, autograd registration, AOT dispatch with static and dynamic shapes), and torch.compile keeps the ops in
one graph whose forward and backward equal eager."""

from __future__ import annotations

import pytest
import torch

from convplus import ConvPlus1d, ConvPlus2d
from convplus.backends import cpu
from convplus.neighborhood import Neighborhood

pytestmark = pytest.mark.skipif(
    cpu.unavailable_reason(torch.device("cpu")) is not None, reason="the C++ kernel does not build here"
)

CASES = [  # (dtype, with a fused conv kernel and a bias, neighborhood): each option at least once
    (torch.float32, False, Neighborhood.of((3, 3), (1, 1))),
    (torch.float64, True, Neighborhood.of((3, 3), (1, 2), (True, False))),
    (torch.float32, True, Neighborhood.of((5, 3), (1, 1), None, "shift")),
    (torch.float64, False, Neighborhood.of((3, 5), (1, 1), (False, True), "shift")),
]
GRID = (4, 5)
HEADS, DQ, D = 2, 3, 2


def _window_inputs(dtype: torch.dtype, convolution: bool, hood: Neighborhood, grad: bool) -> tuple:
    """(q, k, features, pos, temperature) and the kernel's window arguments (v, gain, kernel, tap_index, offsets,
    bounds, bias) for a batch of 2 on ``GRID``, made the way the backend makes them; the float ones require
    grad when ``grad``."""
    v = torch.randn(2, HEADS, D, *GRID, dtype=dtype)
    kernel = torch.randn(HEADS, D, 3, 3, dtype=dtype) if convolution else None
    bias = torch.randn(HEADS, D, dtype=dtype) if convolution else None
    window, geometry = cpu._kernel_arguments(v, kernel, torch.randn(HEADS, dtype=dtype), hood, bias)
    q, k, features = (cpu._as_3d(torch.randn(2, HEADS, DQ, *GRID, dtype=dtype), geometry) for _ in range(3))
    score = (q, k, features, torch.randn(HEADS, DQ, GRID[0] * GRID[1], dtype=dtype), torch.rand(HEADS, dtype=dtype) + 1)
    leaves = [t.detach().requires_grad_(grad) if t.is_floating_point() and t.numel() else t for t in (*score, *window)]
    return tuple(leaves[:5]), tuple(leaves[5:])


@pytest.mark.parametrize(("dtype", "convolution", "hood"), CASES)
def test_forward_ops_pass_opcheck(dtype, convolution, hood):
    (q, k, features, pos, temperature), window = _window_inputs(dtype, convolution, hood, grad=True)
    torch.library.opcheck(torch.ops.convplus.window_mix, (q, k, *window, True))
    torch.library.opcheck(torch.ops.convplus.direct_window_mix, (features, pos, temperature, *window, True))
    x = features.flatten(3)  # (B, K, Dq, N)
    torch.library.opcheck(torch.ops.convplus.direct_score, (x, pos, temperature))
    v, gain = window[0].flatten(3), window[1]
    base = torch.randn_like(v).requires_grad_(True)
    torch.library.opcheck(torch.ops.convplus.global_mix, (q.flatten(3), k.flatten(3), v, gain, base, True))
    torch.library.opcheck(torch.ops.convplus.direct_global_mix, (x, pos, temperature, v, gain, base, True))
    if dtype == torch.float64:  # its registered backward is its derivative (the window ops': the compile test)
        assert torch.autograd.gradcheck(lambda *a: cpu.direct_score_features(*a)[:2], (x, pos, temperature))


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """t (B, K, C, T, H, X) with the same values, stored with its channels innermost."""
    return t.detach().movedim(2, -1).contiguous().movedim(-1, 2).requires_grad_(t.requires_grad)


@pytest.mark.parametrize(("dtype", "convolution", "hood"), CASES[:2])
def test_window_ops_pass_opcheck_on_channels_last_inputs(dtype, convolution, hood):
    """The fake implementations make each output in the layout the kernel makes it (that of v, q, k, x)."""
    (q, k, features, pos, temperature), (v, *rest) = _window_inputs(dtype, convolution, hood, grad=True)
    q, k, features, v = (_channels_last(t) for t in (q, k, features, v))
    torch.library.opcheck(torch.ops.convplus.window_mix, (q, k, v, *rest, True))
    torch.library.opcheck(torch.ops.convplus.direct_window_mix, (features, pos, temperature, v, *rest, True))
    gain, kernel, tap_index, offsets = rest[:4]
    _, probs = cpu.window_mix(q, k, v, *rest, True)
    inputs = (q.detach(), k.detach(), v.detach(), gain.detach(), kernel.detach(), tap_index, probs)
    grad_out = _channels_last(torch.randn_like(v))
    torch.library.opcheck(torch.ops.convplus.window_mix_backward, (*inputs, grad_out.detach(), offsets))
    x = features.flatten(3)  # (B, K, Dq, N), channels innermost
    _check_global_ops(
        q.detach().flatten(3),
        k.detach().flatten(3),
        x.detach(),
        pos.detach(),
        temperature.detach(),
        v.detach().flatten(3),
        gain.detach(),
    )
    torch.library.opcheck(torch.ops.convplus.direct_score, (x, pos, temperature))
    dq, dk, inverse_norm = cpu.direct_score_features(x.detach(), pos.detach(), temperature.detach())
    torch.library.opcheck(
        torch.ops.convplus.direct_score_backward,
        (dq, dk, dk.clone(), inverse_norm, temperature.detach(), x.detach(), True),
    )


def _check_global_ops(q, k, x, pos, temperature, v, gain) -> None:
    """opcheck of the global ops, q, k, x (B, K, Dq, N), v (B, K, D, N), base made like v: the forward ops keeping
    the probabilities and not, with and without the positional encoding, and the backward op."""
    base = torch.randn_like(v)
    for save_probs in (False, True):
        torch.library.opcheck(torch.ops.convplus.global_mix, (q, k, v, gain, base, save_probs))
        for p in (pos, pos.new_zeros(0)):
            torch.library.opcheck(torch.ops.convplus.direct_global_mix, (x, p, temperature, v, gain, base, save_probs))
    _, probs = cpu.global_mix(q, k, v, gain, base, True)
    backward_inputs = (q, k, v, gain, probs.detach(), torch.randn_like(v))
    torch.library.opcheck(torch.ops.convplus.global_mix_backward, tuple(t.detach() for t in backward_inputs))


@pytest.mark.parametrize(("dtype", "convolution", "hood"), CASES)
def test_backward_ops_and_inference_forward_pass_opcheck(dtype, convolution, hood):
    (q, k, features, pos, temperature), window = _window_inputs(dtype, convolution, hood, grad=False)
    v, gain, kernel, tap_index, offsets = window[:5]
    for save_probs in (False, True):  # inference keeps no probabilities: fake and real agree on the empty shape
        torch.library.opcheck(torch.ops.convplus.window_mix, (q, k, *window, save_probs))
    _, probs = cpu.window_mix(q, k, *window, True)
    grad_out = torch.randn_like(v)
    torch.library.opcheck(
        torch.ops.convplus.window_mix_backward, (q, k, v, gain, kernel, tap_index, probs, grad_out, offsets)
    )
    x = features.flatten(3)
    _check_global_ops(q.flatten(3), k.flatten(3), x, pos, temperature, v.flatten(3), gain)
    dq, dk, inverse_norm = cpu.direct_score_features(x, pos, temperature)
    for with_pos in (False, True):
        torch.library.opcheck(
            torch.ops.convplus.direct_score_backward, (dq, dk, dk.clone(), inverse_norm, temperature, x, with_pos)
        )


def _graph_ops(module: torch.nn.Module, x: torch.Tensor) -> set[str]:
    """The custom convplus ops in the graphs dynamo captures from module(x); asserts there is no graph break."""
    explained = torch._dynamo.explain(module)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    (graph,) = explained.graphs
    return {str(node.target) for node in graph.graph.nodes if str(node.target).startswith("convplus.")}


@pytest.mark.parametrize(
    ("score", "op"),
    [("direct", "convplus.direct_window_mix.default"), ("qk", "convplus.window_mix.default")],
)
@pytest.mark.parametrize(
    ("cls", "shape", "kwargs"),
    [
        (ConvPlus2d, (2, 8, 6, 7), {"kernel_size": 3, "window": 3}),
        (ConvPlus1d, (1, 8, 9), {"kernel_size": 3, "window": 5, "causal": True, "proj": False}),
        (ConvPlus2d, (1, 8, 5, 6), {"kernel_size": 5, "window": 3, "border": "shift"}),  # conv term apart
    ],
)
def test_torch_compile_runs_the_fused_ops_without_graph_break_and_matches_eager(score, op, cls, shape, kwargs):
    torch._dynamo.reset()
    module = cls(8, heads=2, score=score, dtype=torch.float64, **kwargs)  # backend 'auto'
    with torch.no_grad():
        module.gain.uniform_(0.5, 1.5)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert _graph_ops(module, x) == {op}  # 'auto' picked the fused kernel, and the graph kept it whole
    results = []
    for run in (module, torch.compile(module, backend="aot_eager", fullgraph=True)):
        y = run(x)
        results.append(
            (
                y,
                *torch.autograd.grad(
                    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), [x, *module.parameters()]
                ),
            )
        )
    for compiled, eager in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("score", "op"), [("direct", "direct_global_mix"), ("qk", "global_mix")])
def test_torch_compile_keeps_the_global_ops_and_matches_eager(score, op):
    """A global layer on a small grid under torch.compile: the fused global op, whole in the graph, forward and
    backward equal to eager."""
    torch._dynamo.reset()
    module = ConvPlus2d(8, heads=2, kernel_size=3, window=None, score=score, dtype=torch.float64)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    assert _graph_ops(module, x) == {f"convplus.{op}.default"}
    results = []
    for run in (module, torch.compile(module, backend="aot_eager", fullgraph=True)):
        y = run(x)
        upstream = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        results.append((y, *torch.autograd.grad((y * upstream).sum(), [x, *module.parameters()])))
    for compiled, eager in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [3, None], ids=["window", "global"])
def test_torch_export_keeps_to_portable_operators(window):
    """An exported program runs outside this process (onnxruntime, another machine), where the custom ops are
    unknown: under torch.export 'auto' takes the 'gathered' formulation for a window, and a global layer makes its
    'direct' score without the kernel's op; the program equals eager."""
    module = ConvPlus2d(8, kernel_size=3, window=window, heads=2).eval()
    x = torch.randn(1, 8, 6, 7)
    program = torch.export.export(module, (x,))
    assert not [node for node in program.graph.nodes if str(node.target).startswith("convplus.")]
    torch.testing.assert_close(program.module()(x), module(x), rtol=1e-5, atol=1e-5)


class _OpCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the names of the ops dispatched under it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("score", "window", "function", "name"),
    [
        ("direct", 3, "direct_window_mix", "direct_window_mix"),
        ("qk", 3, "window_mix", "window_mix"),
        ("direct", None, "direct_global_mix", "direct_global_mix"),  # the 'global' backend's
        ("qk", None, "global_mix", "global_mix"),
    ],
)
def test_inference_calls_run_the_kernel_directly_as_the_op_would(score, window, function, name, monkeypatch):
    """An eager forward that keeps nothing for backward calls the kernel's entry point without the custom op's
    dispatch: the same output as through the op, still under the op's name to the profiler, and through the op
    wherever something must see it (autograd, a dispatch mode)."""
    module = ConvPlus2d(8, kernel_size=3, window=window, heads=2, score=score).eval()
    x = torch.randn(2, 8, 6, 7).contiguous(memory_format=torch.channels_last)
    op_calls = []
    op = getattr(cpu, function)
    monkeypatch.setattr(cpu, function, lambda *args: op_calls.append(args) or op(*args))
    with torch.no_grad():
        direct = module(x)
        assert not op_calls
        with _OpCalls() as calls:
            through_op = module(x)
        with torch.profiler.profile() as profile:
            module(x)
    assert len(op_calls) == 1 and f"convplus.{name}.default" in calls.names
    assert torch.equal(direct, through_op) and direct.stride() == through_op.stride()
    assert f"convplus::{name}" in {event.key for event in profile.key_averages()}
    y = module(x.requires_grad_(True))
    assert len(op_calls) == 2 and y.grad_fn is not None  # kept for backward: through the op, which autograd sees
    assert torch.equal(y, direct)
