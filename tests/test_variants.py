"""Csordás & Schmidhuber's DNC variants (ICLR 2019) wired through the memory, the DNC, the config
and the dashboard. The equations themselves are tested in test_addressing.py."""

import warnings

import pytest
import torch
from torch.autograd import gradcheck

from dnc_lab import DNC, backends
from dnc_lab.backends import native
from dnc_lab.config import ConfigError, config_from_dict
from dnc_lab.memory import Interface, initial_state, interface_sizes, lookup_mask, memory_step, parse_interface

D = torch.float64
ALL_ON = dict(masked_lookup=True, mask_min=0.1, deallocation=True, link_sharpness=True)


def raw_fields(batch, w, r, h, generator, **variants):
    sizes = interface_sizes(w, r, h, **variants)
    return {name: torch.randn(batch, size, generator=generator, dtype=D) for name, size in sizes.items()}


def test_interface_grows_only_with_a_variant_and_keeps_the_plain_layout_as_its_prefix():
    plain = interface_sizes(4, 2, 1)
    both = interface_sizes(4, 2, 1, masked_lookup=True, link_sharpness=True)
    assert list(both)[: len(plain)] == list(plain) and all(both[k] == v for k, v in plain.items())
    assert {k: both[k] for k in list(both)[len(plain):]} == {
        "read_masks": 8, "write_masks": 4, "forward_sharpness": 2, "backward_sharpness": 2}
    assert interface_sizes(4, 2, 1, masked_lookup=False, link_sharpness=False) == plain


def test_lookup_mask_floor_and_parsed_ranges():
    assert torch.allclose(lookup_mask(torch.tensor([0.0, -1e3, 1e3], dtype=D), 0.1),
                          torch.tensor([0.55, 0.1, 1.0], dtype=D), atol=1e-12)
    g = torch.Generator().manual_seed(0)
    iface = parse_interface(raw_fields(3, 4, 2, 2, g, masked_lookup=True, link_sharpness=True),
                            4, 2, 2, mask_min=0.25)
    assert iface.read_masks.shape == (3, 2, 4) and iface.write_masks.shape == (3, 2, 4)
    assert (iface.read_masks >= 0.25).all() and (iface.write_masks <= 1).all()
    assert iface.forward_sharpness.shape == (3, 2) and (iface.backward_sharpness >= 1).all()
    plain = parse_interface(raw_fields(3, 4, 2, 2, g), 4, 2, 2)
    assert plain.read_masks is None and plain.forward_sharpness is None


def _one_hot_interface(w, write_vector, read_modes, free_gate=0.0, write_gate=1.0, **extra):
    one = torch.ones(1, 1, dtype=D)
    return Interface(
        read_keys=torch.zeros(1, 1, w, dtype=D), read_strengths=one,
        write_keys=torch.zeros(1, 1, w, dtype=D), write_strengths=one,
        erase_vectors=torch.ones(1, 1, w, dtype=D), write_vectors=write_vector.view(1, 1, w),
        free_gates=free_gate * one, allocation_gates=one, write_gates=write_gate * one,
        read_modes=torch.tensor(read_modes, dtype=D).view(1, 1, 3), **extra)


def test_deallocation_erases_the_cell_a_free_gate_releases():
    n, w = 4, 3
    vector = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    write = _one_hot_interface(w, vector, [0.0, 0.0, 1.0])
    # step 1 writes the vector to cell 0; read it back with a content key equal to it
    _, state = memory_step(initial_state(1, n, w, 1, dtype=D), write._replace(read_keys=vector.view(1, 1, w),
                                                                           read_strengths=torch.full((1, 1), 50.0, dtype=D)))
    assert state["read_weights"][0, 0, 0] > 0.99
    # step 2 writes nothing and frees what was read
    free = _one_hot_interface(w, torch.zeros(w, dtype=D), [0.0, 0.0, 1.0], free_gate=1.0, write_gate=0.0)
    _, kept = memory_step(state, free)
    _, erased = memory_step(state, free, deallocation=True)
    assert torch.allclose(kept["memory"][0, 0], vector)  # the plain DNC only lowers the usage
    assert erased["memory"][0, 0].abs().max() < 0.02  # ψ[0] = 1 - read weight < 0.01
    assert torch.allclose(kept["usage_vector"], erased["usage_vector"])


def test_masks_of_ones_give_the_plain_memory_step():
    g = torch.Generator().manual_seed(1)
    b, n, w, r, h = 2, 5, 3, 2, 1
    state = initial_state(b, n, w, r, h, dtype=D)
    for _ in range(3):
        iface = parse_interface(raw_fields(b, w, r, h, g), w, r, h)
        ones = iface._replace(read_masks=torch.ones(b, r, w, dtype=D), write_masks=torch.ones(b, h, w, dtype=D))
        reads, new = memory_step(state, iface)
        masked_reads, masked = memory_step(state, ones)
        assert torch.allclose(reads, masked_reads, atol=1e-12) and torch.allclose(new["memory"], masked["memory"])
        state = new


def test_sharpness_makes_a_blurred_forward_link_one_hot():
    n, w = 4, 2
    state = initial_state(1, n, w, 1, dtype=D)
    # a link matrix blurred as after several soft writes: from cell 0, 0.6 to cell 1, 0.3 to cell 2
    state["link_matrix"] = torch.zeros(1, 1, n, n, dtype=D)
    state["link_matrix"][0, 0, 1, 0], state["link_matrix"][0, 0, 2, 0] = 0.6, 0.3
    state["read_weights"] = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]], dtype=D)
    forward_only = _one_hot_interface(w, torch.zeros(w, dtype=D), [0.0, 1.0, 0.0], write_gate=0.0)
    _, plain = memory_step(state, forward_only)
    assert torch.allclose(plain["read_weights"][0, 0], torch.tensor([0, 0.6, 0.3, 0], dtype=D))
    sharp = forward_only._replace(forward_sharpness=torch.full((1, 1), 20.0, dtype=D),
                                  backward_sharpness=torch.ones(1, 1, dtype=D))
    _, sharpened = memory_step(state, sharp)
    # (0.3 / 0.6)^20 ≈ 1e-6 of the peak
    assert sharpened["read_weights"][0, 0, 1] > 1 - 1e-5


def test_gradcheck_of_a_memory_step_with_every_variant_float64():
    """Gradients through the new fields and the inputs the variants touch (the rest of the step has
    its own gradcheck in test_memory.py; checking only these keeps the test fast)."""
    g = torch.Generator().manual_seed(3)
    b, n, w, r, h = 2, 4, 3, 2, 1
    flags = dict(masked_lookup=True, link_sharpness=True)
    start = initial_state(b, n, w, r, h, dtype=D)
    for _ in range(2):
        _, start = memory_step(start, parse_interface(raw_fields(b, w, r, h, g, **flags), w, r, h, 0.1),
                               deallocation=True)
    raw = raw_fields(b, w, r, h, g, **flags)
    checked = ["read_masks", "write_masks", "forward_sharpness", "backward_sharpness", "free_gates"]
    state_checked = ["memory", "read_weights"]

    def step(*tensors):
        fields = {**raw, **dict(zip(checked, tensors[: len(checked)]))}
        prev = {**start, **dict(zip(state_checked, tensors[len(checked):]))}
        reads, new = memory_step(prev, parse_interface(fields, w, r, h, 0.1), deallocation=True)
        return reads, new["memory"], new["read_weights"]

    inputs = [raw[k].clone().requires_grad_(True) for k in checked]
    inputs += [start[k].detach().clone().requires_grad_(True) for k in state_checked]
    assert gradcheck(step, tuple(inputs), eps=1e-6, atol=1e-5)


def test_dnc_keywords_size_the_interface_and_show_the_new_views():
    torch.manual_seed(0)
    plain = DNC(5, 8, nr_cells=6, read_heads=2, cell_size=3)
    model = DNC(5, 8, nr_cells=6, read_heads=2, cell_size=3, **ALL_ON)
    access = model.cores[0].memories[0]
    extra = 2 * 3 + 1 * 3 + 2 + 2  # read masks, write mask, forward and backward sharpness
    assert access.interface.out_features == plain.cores[0].memories[0].interface.out_features + extra
    assert (model.masked_lookup, model.mask_min, model.deallocation, model.link_sharpness) == (True, 0.1, True, True)
    _, _, views = model.trace(torch.randn(2, 7, 5))
    assert views["read_masks"].shape == (7, 6) and views["write_masks"].shape == (7, 3)
    assert views["forward_sharpness"].shape == (7, 2) and (views["backward_sharpness"] >= 1).all()
    assert (views["read_masks"] >= 0.1 - 1e-6).all()
    _, _, plain_views = plain.trace(torch.randn(2, 7, 5))
    assert not {"read_masks", "forward_sharpness"} & set(plain_views)


@pytest.mark.parametrize("flag", ["masked_lookup", "deallocation", "link_sharpness"])
def test_a_backend_without_the_variant_is_passed_over_with_the_reason(flag, monkeypatch):
    """The native kernels implement every variant now (tests/test_native.py): a native module that
    lacks this one stands for any backend that does."""
    monkeypatch.setattr(backends, "_said", set())
    monkeypatch.setattr(native, "SUPPORTED_VARIANTS", tuple(v for v in native.SUPPORTED_VARIANTS if v != flag))
    torch.manual_seed(1)
    auto = DNC(5, 8, nr_cells=6, read_heads=1, cell_size=3, **{flag: True})
    assert auto.backend_choice().name == "reference"
    assert f"native passed over: its kernels do not implement {flag}" in auto.backend_choice().reason
    reference = DNC(5, 8, nr_cells=6, read_heads=1, cell_size=3, backend="reference", **{flag: True})
    reference.load_state_dict(auto.state_dict())
    x = torch.randn(2, 4, 5)
    assert torch.equal(auto(x)[0], reference(x)[0])
    asked = DNC(5, 8, nr_cells=6, read_heads=1, cell_size=3, native=True, **{flag: True})
    with pytest.warns(UserWarning, match=f"backend='native': using the reference memory step, because native "
                                         f"passed over: its kernels do not implement {flag}"):
        asked(x)


@pytest.mark.parametrize("kwargs, message", [
    (dict(masked_lookup=True, mask_min=1.0), r"mask_min=1.0: expected a number in \[0, 1\)"),
    (dict(masked_lookup=True, mask_min=-0.1), r"mask_min=-0.1: expected a number in \[0, 1\)"),
    (dict(mask_min=0.1), r"mask_min=0.1 has no effect without masked_lookup=True"),
    (dict(deallocation=1), r"deallocation=1: expected True or False"),
])
def test_dnc_rejects_bad_variant_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DNC(5, 8, **kwargs)


def _config(**model):
    return {"model": model, "task": {"name": "copy", "bits": 4, "max_length": 3}}


def test_config_passes_the_variants_to_the_model_and_checks_them():
    cfg = config_from_dict(_config(**ALL_ON))
    kwargs = cfg.model_kwargs()
    assert {k: kwargs[k] for k in ALL_ON} == ALL_ON
    DNC(**kwargs)  # the keywords are DNC's
    with pytest.raises(ConfigError, match=r"model.mask_min = 1.0: expected a value >= 0.0 and < 1.0"):
        config_from_dict(_config(masked_lookup=True, mask_min=1.0))
    with pytest.raises(ConfigError, match=r"--set model.mask_min=0.2: model.mask_min = 0.2 has no effect without"):
        config_from_dict(_config(), overrides=["model.mask_min=0.2"])


def test_dashboard_draws_masks_and_sharpness_only_for_models_that_have_them():
    from dnc_lab.viz.eventlog import snapshot_event
    from dnc_lab.viz.figures import snapshot_figures

    torch.manual_seed(2)
    dims = {"nr_cells": 6, "cell_size": 3, "read_heads": 2, "num_writes": 1}
    io = torch.zeros(7, 5).numpy()
    windows = {}
    for name, kwargs in (("plain", {}), ("variants", ALL_ON)):
        model = DNC(5, 8, nr_cells=6, read_heads=2, cell_size=3, **kwargs)
        _, _, views = model.trace(torch.randn(1, 7, 5))
        event = snapshot_event(10, 0.5, views, dims, io, io, io, io[:, 0])
        windows[name] = {body["win"]: body for _, body in snapshot_figures(name, event)}
    assert set(windows["variants"]) - set(windows["plain"]) == {
        "read-mask-0", "read-mask-1", "write-mask-0", "link-sharpness"}
    sharpness = windows["variants"]["link-sharpness"]
    assert [trace["name"] for trace in sharpness["data"]] == ["r0 forward", "r1 forward", "r0 backward", "r1 backward"]
    assert min(min(trace["y"]) for trace in sharpness["data"]) >= 1
    mask = windows["variants"]["read-mask-1"]["data"][0]["z"]
    assert len(mask) == 3 and len(mask[0]) == 7  # [word position, time]
