"""The generated modules' bound launches (`_PsmcLaunch`), against a stand-in for Triton.

On a GPU, after a plan's first launch through `kernel[grid](...)` a launch calls the compiled
kernel's `run` itself. These tests check, without a GPU, that it passes what Triton's own
`JITFunction.run` passes (every argument in declaration order, constexprs included, after the
grid, stream, function, metadata and the three hook slots; pointers as the integers Triton's
launcher reads from the tensors), and that it goes back to the normal path whenever Triton's
specialization could differ.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import triton.language as tl
from triton.knobs import HookChain

from psmc import tree_backend, triton_backend

from helpers import example_op
from triton_cases import load


class FakeCompiled:
    def __init__(self):
        self.function, self.packed_metadata, self.calls = object(), object(), []

    def run(self, *args):
        self.calls.append(args)


class FakeKernel:
    def __init__(self, arg_names=("x_ptr", "n", "T", "HAS_INIT", "BLOCK_T")):
        self.arg_names = list(arg_names)
        self.compiled, self.slow_calls = FakeCompiled(), []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.slow_calls.append((grid, args, kwargs))
            return self.compiled
        return launch


def fake_tensor(ptr: int):
    t = mock.Mock(spec=torch.Tensor)
    t.is_cuda = True
    t.data_ptr.return_value = ptr
    return t


@pytest.fixture
def launcher_env(monkeypatch):
    mod = triton_backend.module(load("linrec").ir, interpret=True)
    # Triton's own default: empty hook chains (None on older releases, tested below)
    runtime = SimpleNamespace(launch_enter_hook=HookChain(), launch_exit_hook=HookChain())
    active = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 1234)
    fake_triton = SimpleNamespace(knobs=SimpleNamespace(runtime=runtime),
                                  runtime=SimpleNamespace(driver=SimpleNamespace(active=active)))
    monkeypatch.setattr(mod, "triton", fake_triton)
    return mod, runtime


def bound(mod, kernel, grid=(7, 3)):
    """A launch of `kernel` with one tensor group (pointer, stride 5) and the scalar 100."""
    return mod._PsmcLaunch(kernel, grid, [[5]], [True], [100], dict(BLOCK_T=64, num_warps=4, HAS_INIT=False))


def test_direct_launch_passes_what_triton_would(launcher_env):
    mod, _ = launcher_env
    kernel = FakeKernel()
    launch = bound(mod, kernel)
    x = fake_tensor(4096)
    launch([x], x)
    constexprs = dict(BLOCK_T=64, num_warps=4, HAS_INIT=False)  # not in declaration order
    assert kernel.slow_calls == [((7, 3), (x, 5, 100), constexprs)] and kernel.compiled.calls == []
    y = fake_tensor(8192)
    launch([y], y)
    c = kernel.compiled
    assert len(kernel.slow_calls) == 1
    assert c.calls == [(7, 3, 1, 1234, c.function, c.packed_metadata, None, None, None,
                        8192, 5, 100, False, 64)]


def test_direct_launch_falls_back_when_specialization_could_differ(launcher_env):
    mod, runtime = launcher_env
    kernel = FakeKernel()
    launch = bound(mod, kernel, (3,))
    launch([fake_tensor(4096)], fake_tensor(4096))
    launch([fake_tensor(4100)], fake_tensor(4096))  # not 16-byte aligned
    assert len(kernel.slow_calls) == 2 and kernel.compiled.calls == []
    runtime.launch_enter_hook.add(lambda *a: None)  # a profiler's hook must see every launch
    launch([fake_tensor(8192)], fake_tensor(8192))
    assert len(kernel.slow_calls) == 3 and kernel.compiled.calls == []
    runtime.launch_enter_hook = lambda *a: None  # a bare callable (older Triton) likewise
    launch([fake_tensor(8192)], fake_tensor(8192))
    assert len(kernel.slow_calls) == 4 and kernel.compiled.calls == []
    runtime.launch_enter_hook = None  # older Triton's empty slot
    launch([fake_tensor(8192)], fake_tensor(8192))
    assert len(kernel.slow_calls) == 4 and len(kernel.compiled.calls) == 1
    runtime.launch_enter_hook = HookChain()  # an emptied chain: direct again
    launch([fake_tensor(8192)], fake_tensor(8192))
    assert len(kernel.slow_calls) == 4 and len(kernel.compiled.calls) == 2


def test_absent_groups_get_the_dummy(launcher_env):
    """A group the plan leaves out (no initial state, say) gets the dummy tensor's pointer; the
    dummy's alignment counts like any pointer passed."""
    mod, _ = launcher_env
    kernel = FakeKernel(["x_ptr", "n", "init_ptr", "m", "T", "HAS_INIT", "BLOCK_T"])
    launch = mod._PsmcLaunch(kernel, (2,), [[5], [0]], [True, False], [100],
                             dict(BLOCK_T=64, num_warps=4, HAS_INIT=False))
    x, y = fake_tensor(4096), fake_tensor(8192)
    launch([x], y)
    assert kernel.slow_calls[0][1] == (x, 5, y, 0, 100)
    launch([x], y)
    c = kernel.compiled
    assert c.calls == [(2, 1, 1, 1234, c.function, c.packed_metadata, None, None, None,
                        4096, 5, 8192, 0, 100, False, 64)]
    launch([x], fake_tensor(8200))
    assert len(kernel.slow_calls) == 2 and len(c.calls) == 1


def test_only_a_kernel_specialized_for_aligned_pointers_is_launched_directly(launcher_env):
    """What `kernel[grid]` returns is specialized for that launch's pointers: one compiled for a
    misaligned pointer is never reused; the first one compiled for aligned pointers is."""
    mod, _ = launcher_env
    kernel = FakeKernel()
    launch = bound(mod, kernel)
    for ptr in (4100, 4100, 4096, 8192):
        launch([fake_tensor(ptr)], fake_tensor(ptr))
    assert len(kernel.slow_calls) == 3 and len(kernel.compiled.calls) == 1


def test_cpu_tensors_always_take_triton_path(launcher_env):
    mod, _ = launcher_env
    kernel = FakeKernel()
    launch = bound(mod, kernel)
    x = torch.zeros(4)
    for _ in range(2):
        launch([x], x)
    assert len(kernel.slow_calls) == 2 and kernel.compiled.calls == []


def test_tree_host_code_launches_directly(monkeypatch):
    """The tree kernels' host code (templates/tree_host.j2) uses the same bound launch: one per
    kernel, grid, length and dtypes, direct from the second launch on."""
    op = example_op("nonassoc_mix")
    mod = tree_backend.module(op.ir, 16, 4, interpret=True)
    scan_mod = triton_backend.module(load("linrec").ir, interpret=True)
    assert inspect.getsource(mod._PsmcLaunch) == inspect.getsource(scan_mod._PsmcLaunch)
    runtime = SimpleNamespace(launch_enter_hook=HookChain(), launch_exit_hook=HookChain())
    active = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 1234)
    monkeypatch.setattr(mod, "triton", SimpleNamespace(
        knobs=SimpleNamespace(runtime=runtime), runtime=SimpleNamespace(driver=SimpleNamespace(active=active))))
    monkeypatch.setattr(mod, "_TREE_LAUNCHERS", {})
    kernel = FakeKernel()
    kernel.arg_names = ["x_u_ptr", "pin_ptr", "y_y_ptr", "n", "HAS_START", "ACC"]
    table = dict(getattr(mod, "NONASSOC_MIX_TREE"), kernels={"lanes_down_x": kernel})
    tree = mod._TreeCall(table, op.spec, torch.device("cuda"), 2, torch.float32)
    x, pin, y = fake_tensor(4096), fake_tensor(8192), fake_tensor(16384)
    for _ in range(3):
        tree.launch("lanes_down_x", 100, x, pin, y, HAS_START=True)
    grid = 2 * -(-100 // table["lane_block"])
    assert kernel.slow_calls == [((grid,), (x, pin, y, 100),
                                  dict(HAS_START=True, ACC=tl.float32, num_warps=table["lane_warps"]))]
    c = kernel.compiled
    assert c.calls == 2 * [(grid, 1, 1, 1234, c.function, c.packed_metadata, None, None, None,
                            4096, 8192, 16384, 100, True, tl.float32)]
    tree.launch("lanes_down_x", 101, x, pin, y, HAS_START=True)  # another length: Triton's path first
    assert len(kernel.slow_calls) == 2 and len(c.calls) == 2
