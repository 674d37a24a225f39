"""The backend boundary (dnc_lab/backends/): the choice, its reasons, the checks before C++, the
registered operators, the build cache key, threads, and a learning run on every backend."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.library import opcheck

from dnc_lab import DNC, backends, sequence
from dnc_lab import memory as M
from dnc_lab.backends import native
from dnc_lab.controller import rnn_weights

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and os.environ.get("CI") != "true",
                                    reason="no C++ compiler (g++) to build the native backend")
SMALL = dict(input_size=3, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2)


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    monkeypatch.setattr(backends, "_said", set())


# --- the choice ----------------------------------------------------------------------------------


@needs_compiler
def test_auto_takes_native_on_a_cpu_and_says_why_it_passes_over_it():
    assert DNC(**SMALL).backend == "native"
    assert DNC(**SMALL).backend_choice() == ("native", "")
    cases = {
        "num_writes=2": dict(num_writes=2),
        "debug=True views show the parsed interface": dict(debug=True),
    }
    for reason, kwargs in cases.items():
        choice = DNC(**SMALL, **kwargs).backend_choice()
        assert choice.name == "reference" and reason in choice.reason, choice
    meta = DNC(**SMALL).backend_choice(torch.device("meta"))
    assert meta == ("reference", "no fast backend for meta tensors")
    half = DNC(**SMALL).backend_choice(dtype=torch.bfloat16)
    assert half.name == "reference" and "not torch.bfloat16" in half.reason


@needs_compiler
@pytest.mark.parametrize("kwargs", [dict(rnn_type=r, num_layers=l, num_writes=h, bidirectional=b, debug=d)
                                    for r, l, h, b, d in itertools.product(["lstm", "gru", "ff"], [1, 2], [1, 2],
                                                                           [False, True], [False, True])])
def test_every_configuration_runs_on_auto_fast_where_covered(kwargs):
    model = DNC(**SMALL, **kwargs)
    fast = kwargs["num_writes"] == 1 and not kwargs["debug"]
    assert model.backend == ("native" if fast else "reference")
    assert (model.backend_choice().reason == "") == fast  # a reason whenever the reference runs
    output = model(torch.randn(2, 4, 3))[0]
    output.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_choice_is_logged_once_per_process(caplog):
    with caplog.at_level(logging.INFO, logger="dnc_lab"):
        for _ in range(3):
            DNC(**SMALL, num_writes=2).backend
    said = [r.getMessage() for r in caplog.records if "dnc_lab backend" in r.getMessage()]
    assert said == ["dnc_lab backend: reference (native passed over: it has one write head, not num_writes=2)"]


def test_bad_backend_names_are_refused():
    with pytest.raises(ValueError, match=r"backend='cuda': expected one of \['auto', 'reference', 'native', 'triton'\]"):
        DNC(**SMALL, backend="cuda")
    with pytest.raises(ValueError, match="native='yes': expected True, False or None"):
        DNC(**SMALL, native="yes")


# --- the boundary ----------------------------------------------------------------------------------


def _step_inputs(batch=2, cells=5, width=3, reads=2, dtype=torch.float64):
    size = sum(M.interface_sizes(width, reads, 1).values())
    raw = torch.randn(batch, size, dtype=dtype)
    state = list(M.initial_state(batch, cells, width, reads, 1, dtype=dtype).values())
    return raw, state


@needs_compiler
def test_a_state_of_another_dtype_is_refused_before_any_kernel_runs():
    model = DNC(**SMALL)
    x = torch.randn(2, 4, 3)
    _, (hidden, memory, reads) = model(x)
    wrong = {key: value.double() for key, value in memory.items()}
    with pytest.raises(ValueError, match=r"memory state 'memory' is torch.float64 on cpu, but the input is torch.float32"):
        model(x, (hidden, wrong, reads))
    with pytest.raises(ValueError, match=r"input is torch.float64 on cpu, but the model's parameters are torch.float32"):
        model(x.double())


@needs_compiler
def test_the_kernels_check_dtype_device_shape_and_interface_width():
    raw, state = _step_inputs()
    state_f32 = [state[0].float(), *state[1:]]
    with pytest.raises(ValueError, match="memory is torch.float32 but the raw interface is torch.float64"):
        native.memory_forward(raw, state_f32)
    with pytest.raises(ValueError, match=r"the raw interface has shape \(2, 27\), expected \[2, 28\]"):
        native.memory_forward(raw[:, :-1], state)
    with pytest.raises(ValueError, match=r"read_weights has shape \(2, 2, 4\), expected \[2, 2, 5\]"):
        native.memory_forward(raw, [*state[:3], state[3][..., :4], *state[4:]])
    with pytest.raises(ValueError, match="usage_vector is on meta, expected cpu tensors"):
        native.memory_forward(raw, [*state[:5], state[5].to("meta")])
    with pytest.raises(ValueError, match="raw interface is torch.float16, expected float32 or float64"):
        native.memory_forward(raw.half(), [s.half() for s in state])
    with pytest.raises(ValueError, match="out link_matrix must be a contiguous torch.float64 tensor of shape"):
        native.memory_forward(raw, state, out=[None, None, torch.empty(2, 1, 5, 5).double().transpose(2, 3)])
    with pytest.raises(ValueError, match=r"out order must be a contiguous torch.int32 tensor of shape \[2, 5\]"):
        native.memory_forward(raw, state, out=[None] * 8 + [torch.empty(2, 5)])
    outputs, saved = native.memory_forward(raw, state)
    with pytest.raises(ValueError, match="the gradient of link_matrix is torch.float32"):
        native.memory_backward(saved, [torch.ones_like(outputs[0]), torch.ones_like(outputs[1]),
                                       outputs[2].float(), *outputs[3:]])


@needs_compiler
def test_the_native_step_and_the_sequence_pass_opcheck():
    raw, state = _step_inputs()
    raw.requires_grad_()
    assert set(opcheck(native._step_op, (raw, *state, *backends.PLAIN)).values()) == {"SUCCESS"}

    torch.manual_seed(0)
    model = DNC(4, 8, nr_cells=5, cell_size=3, read_heads=2, num_hidden_layers=2, backend="native").double()
    core, steps, batch = model.cores[0], 4, 2
    lstm = [t for layer in rnn_weights(core.controllers[0]) for t in layer]
    access = core.memories[0]
    memory = list(access.initial_state(batch, torch.float64, torch.device("cpu")).values())
    x = torch.randn(steps, batch, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(2, batch, 8, dtype=torch.float64)
    reads = torch.zeros(batch, 6, dtype=torch.float64)
    for link_every in (1, 3):  # every link kept; links recomputed in segments
        args = ("native", x, h0, h0.clone(), reads, memory, lstm, access.interface.weight, access.interface.bias, 20.0,
                link_every, *backends.PLAIN)
        assert set(opcheck(sequence._sequence_op, args).values()) == {"SUCCESS"}


@needs_compiler
def test_the_sequence_operator_traces_on_the_meta_device():
    """Its fake implementation gives every output's shape without running C++."""
    x = torch.empty(5, 3, 4, device="meta")
    lstm = [torch.empty(32, 4 + 6, device="meta"), torch.empty(32, 8, device="meta"), torch.empty(32, device="meta"),
            torch.empty(32, device="meta")]
    memory = [torch.empty(3, 5, 3, device="meta"), torch.empty(3, 1, 5, 5, device="meta"),
              torch.empty(3, 1, 5, device="meta"), torch.empty(3, 2, 5, device="meta"),
              torch.empty(3, 1, 5, device="meta"), torch.empty(3, 5, device="meta")]
    h0 = torch.empty(1, 3, 8, device="meta")
    size = native.interface_size(5, 3, 2)
    out = sequence._sequence_op("native", x, h0, h0, torch.empty(3, 6, device="meta"), memory, lstm,
                                torch.empty(size, 8, device="meta"), torch.empty(size, device="meta"), 20.0, 2,
                                *backends.PLAIN)
    assert out[0].shape == (5, 3, 14) and out[0].device.type == "meta"
    assert [tuple(t.shape) for t in out[4:10]] == [tuple(m.shape) for m in memory]


# --- the build -------------------------------------------------------------------------------------


def test_build_cache_key_covers_compiler_version_flags_and_cpu_features(monkeypatch):
    if shutil.which("g++") is None:
        pytest.skip("no g++")  # the key asks the compiler its version
    base = native.library_path("g++")
    monkeypatch.setattr(native, "_compiler_id", lambda compiler: "g++ (Other) 99.1")
    other_compiler = native.library_path("g++")
    monkeypatch.undo()
    cpu = native._cpu_id()
    monkeypatch.setattr(native, "_cpu_id", lambda: cpu + " one_more_feature_flag")
    other_cpu = native.library_path("g++")
    monkeypatch.undo()
    monkeypatch.setattr(native, "FLAGS", native.FLAGS + ["-O2"])
    other_flags = native.library_path("g++")
    assert len({base, other_compiler, other_cpu, other_flags}) == 4
    assert "flags" in native._cpu_id() or "Features" in native._cpu_id()  # the full feature list is in it


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_a_missing_compiler_falls_back_with_one_clear_warning(tmp_path):
    result = _python("""
        import warnings, torch
        from dnc_lab import DNC
        auto = DNC(3, 8, nr_cells=4, cell_size=4, read_heads=1)
        print("auto:", auto.backend_choice().describe())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                model = DNC(3, 8, nr_cells=4, cell_size=4, read_heads=1, backend="native")
                model(torch.randn(2, 3, 3))
        print("warnings:", [str(w.message) for w in caught])
    """, CXX="no-such-compiler", DNC_LAB_CACHE=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "auto: reference (native passed over: the native memory step is unavailable: no C++ compiler: " \
           "'no-such-compiler' is not on PATH" in result.stdout
    assert result.stdout.count("using the reference memory step, because") == 1


@needs_compiler
def test_torch_set_num_threads_governs_the_kernels():
    """The kernels take torch's thread count: one torch thread starts no thread, two start at most
    one more worker (here torch's own OpenMP pool serves both: the library links the same runtime)."""
    code = """
        import os, torch
        from dnc_lab import memory as M
        from dnc_lab.backends import native
        torch.set_num_threads({threads})
        batch, cells, width, reads = 32, 128, 8, 2
        raw = torch.randn(batch, sum(M.interface_sizes(width, reads, 1).values()))
        state = list(M.initial_state(batch, cells, width, reads, 1).values())
        native.load()
        before = len(os.listdir("/proc/self/task"))
        for _ in range(3):
            outputs, saved = native.memory_forward(raw, state)
            native.memory_backward(saved, [torch.ones_like(o) for o in outputs])
        print(len(os.listdir("/proc/self/task")) - before)
    """
    one = _python(code.format(threads=1))
    two = _python(code.format(threads=2))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert int(one.stdout) == 0
    assert int(two.stdout) <= 1


# --- learning ----------------------------------------------------------------------------------------


def _available_backends() -> list[str]:
    names = ["reference"]
    if shutil.which("g++") is not None or os.environ.get("CI") == "true":
        names.append("native")
    return names


@pytest.mark.slow
@pytest.mark.parametrize("backend", _available_backends())
def test_a_tiny_copy_task_is_learned_on_every_backend(backend, tmp_path):
    from dnc_lab import runs, training
    from dnc_lab.config import config_from_dict, save_config

    raw = {"model": {"hidden_size": 32, "nr_cells": 8, "cell_size": 8, "read_heads": 1, "backend": backend},
           "task": {"name": "copy", "bits": 4, "min_length": 1, "max_length": 2},
           "train": {"batch_size": 16, "steps": 400, "lr": 1e-2, "summarize_freq": 50, "check_freq": 1000, "seed": 0,
                     "eval_batch_size": 50, "threads": 1},
           "viz": {"enabled": False}}
    cfg = config_from_dict(raw)
    run_dir = tmp_path / backend
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    result = training.train(run_dir, cfg, torch.device("cpu"), progress=False, echo=lambda *a: None)
    metrics = runs.read_metrics(run_dir)
    assert metrics[0]["ber"] > 0.2  # the first 50 steps: far from learnt (chance is 0.5)
    assert result.last["ber"] < 0.1, result.last
    assert runs.read_status(run_dir)["backend"] == backend


@needs_compiler
def test_backward_gets_no_zero_gradients_for_the_saved_buffers(monkeypatch):
    """The forward operator returns its saved state; autograd must not make a zero gradient for each
    of those buffers (that doubled the peak memory of a training step)."""
    seen = []
    original = sequence._gradient

    def spy(ctx, grads):
        seen.append([g is None for g in list(grads)[sequence.PUBLIC:]])
        return original(ctx, grads)

    monkeypatch.setattr(sequence, "_gradient", spy)
    sequence._sequence_op.register_autograd(spy, setup_context=sequence._setup_context)
    try:
        output, _ = DNC(**SMALL)(torch.randn(2, 5, 3))
        output.sum().backward()
    finally:
        sequence._sequence_op.register_autograd(original, setup_context=sequence._setup_context)
    assert len(seen) == 1 and len(seen[0]) > 10 and all(seen[0])


def test_kernels_refuse_variants_they_do_not_implement(monkeypatch):
    """A fast backend handed a variant its kernels lack says so instead of computing the plain DNC
    (the native kernels implement every variant: here a native module that lacks one)."""
    monkeypatch.setattr(native, "SUPPORTED_VARIANTS", ("masked_lookup",))
    variants = backends.Variants(link_sharpness=True)
    with pytest.raises(ValueError, match="native kernels do not implement link_sharpness"):
        backends.check_variants(native.NAME, native.SUPPORTED_VARIANTS, variants)
    raw, state = _step_inputs()
    with pytest.raises(ValueError, match=r"native kernels do not implement link_sharpness \(they implement masked_lookup\)"):
        native.memory_forward(raw, state, variants=variants)
    with pytest.raises(TypeError, match="must be a dnc_lab.backends.Variants"):
        backends.check_variants(native.NAME, native.SUPPORTED_VARIANTS, {"deallocation": True})


def test_variants_of_a_config_name_what_is_switched_on():
    model = DNC(**SMALL, link_sharpness=True, masked_lookup=True, mask_min=0.1)
    variants = backends.Variants.of(model.core_config)
    assert variants == backends.Variants(True, 0.1, False, True)
    assert variants.names() == ["masked_lookup", "link_sharpness"]
    assert backends.Variants.of(DNC(**SMALL).core_config) == backends.PLAIN
