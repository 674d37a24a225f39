"""The DNC module: pytorch-dnc 1.1.0's contract, and where it is paper-correct instead."""

import itertools

import numpy as np
import pytest
import torch

from dnc_lab import DNC

SMALL = dict(hidden_size=12, nr_cells=6, cell_size=4, read_heads=2)


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(input_size=5, **SMALL)
    args.update(kwargs)
    return DNC(**args)


def sequence(batch=3, steps=8, width=5, seed=1, dtype=torch.float32):
    return torch.randn(batch, steps, width, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- the pytorch-dnc contract -----------------------------------------------------------------------

def test_seed_readme_example_runs_unchanged_but_for_the_import():
    rnn = DNC(input_size=64, hidden_size=128, rnn_type="lstm", num_layers=4, nr_cells=100, cell_size=32,
              read_heads=4, batch_first=True, gpu_id=-1)
    (controller_hidden, memory, read_vectors) = (None, None, None)
    output, (controller_hidden, memory, read_vectors) = rnn(
        torch.randn(10, 4, 64), (controller_hidden, memory, read_vectors), reset_experience=True
    )
    assert output.shape == (10, 4, 64)
    assert read_vectors.shape == (10, 4 * 32)
    assert len(controller_hidden) == 4 and controller_hidden[0][0].shape == (2, 10, 128)  # (h, c) per layer
    assert memory["memory"].shape == (10, 100, 32)


def test_state_shapes_follow_pytorch_dnc():
    model = make(num_writes=1)
    _, (hidden, memory, reads) = model(sequence())
    b, n, w, r = 3, 6, 4, 2
    expected = {"memory": (b, n, w), "link_matrix": (b, 1, n, n), "precedence": (b, 1, n),
                "read_weights": (b, r, n), "write_weights": (b, 1, n), "usage_vector": (b, n)}
    assert {k: tuple(v.shape) for k, v in memory.items()} == expected
    assert reads.shape == (b, r * w)
    h, c = hidden[0]
    assert h.shape == c.shape == (2, b, 12)  # num_hidden_layers=2 by default, as in pytorch-dnc


def test_separate_memories_per_layer_when_not_shared():
    model = make(num_layers=3, share_memory=False)
    _, (hidden, memory, _) = model(sequence())
    assert isinstance(memory, list) and len(memory) == 3 and len(hidden) == 3
    assert len(model.cores[0].memories) == 3


def test_output_size_defaults_to_input_size_and_can_be_changed():
    assert make()(sequence())[0].shape == (3, 8, 5)
    assert make(output_size=2)(sequence())[0].shape == (3, 8, 2)


def test_debug_views_have_one_row_per_step_of_batch_element_zero():
    model = make(debug=True, num_writes=2)
    x = sequence(steps=7)
    output, (_, memory, _), views = model(x)
    n, w, r, h = 6, 4, 2, 2
    widths = {"memory": n * w, "link_matrix": h * n * n, "precedence": h * n, "read_weights": r * n,
              "write_weights": h * n, "usage_vector": n, "write_gate": h, "allocation_gate": h,
              "free_gates": r, "read_modes": r * (2 * h + 1)}
    assert {k: v.shape for k, v in views.items()} == {k: (7, width) for k, width in widths.items()}
    assert all(isinstance(v, np.ndarray) for v in views.values())
    # the last row is the final state of batch element 0
    assert np.allclose(views["memory"][-1], memory["memory"][0].detach().numpy().ravel())
    assert np.allclose(views["usage_vector"][-1], memory["usage_vector"][0].detach().numpy())
    # trace() gives the same views on a model built without debug
    plain = make(num_writes=2)
    traced_output, _, traced_views = plain.trace(x)
    assert torch.allclose(traced_output, output)
    assert all(np.allclose(traced_views[k], views[k]) for k in views)


def test_pass_through_memory_false_returns_no_read_vectors():
    model = make()
    output, (_, _, reads) = model(sequence(), pass_through_memory=False)
    assert reads is None and output.shape == (3, 8, 5)


def test_reset_experience_empties_a_given_memory():
    model = make().eval()
    x = sequence()
    _, (_, memory, _) = model(x)
    fresh = model(x)[0]
    continued = model(x, (None, memory, None))[0]
    reset = model(x, (None, memory, None), reset_experience=True)[0]
    assert torch.allclose(reset, fresh)
    assert not torch.allclose(continued, fresh)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="rnn_type='transformer'"):
        make(rnn_type="transformer")
    with pytest.raises(ValueError, match="nr_cells=0"):
        make(nr_cells=0)
    with pytest.raises(ValueError, match=r"input has shape \(3, 8, 4\)"):
        make()(sequence(width=4))
    model = make()
    _, (_, memory, _) = model(sequence())
    memory = dict(memory, memory=memory["memory"][:, :3])
    with pytest.raises(ValueError, match="'memory' has shape"):
        model(sequence(), (None, memory, None))


def test_to_moves_everything_and_dtype_follows_the_model():
    model = make().to(torch.float64)
    output, (hidden, memory, reads) = model(sequence(dtype=torch.float64))
    assert output.dtype == reads.dtype == memory["link_matrix"].dtype == torch.float64
    # no tensor is created on a fixed device inside forward: the whole pass runs on 'meta'
    meta = make().to("meta")
    output, (_, memory, _) = meta(sequence().to("meta"))
    assert output.device.type == "meta" and memory["memory"].device.type == "meta"


def test_device_keyword_and_gpu_id_minus_one_mean_cpu():
    assert next(make(gpu_id=-1).parameters()).device.type == "cpu"
    assert next(make(device="cpu").parameters()).device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_asking_for_a_missing_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        make(gpu_id=0)


# --- paper-correct where pytorch-dnc is not -----------------------------------------------------------

def test_controller_sees_the_previous_steps_read_vectors():
    """Cut the controller's read-vector inputs: step 0 is unchanged (reads start at zero), later steps change."""
    model = make(rnn_type="lstm", num_hidden_layers=1).eval()
    x = sequence()
    full = model(x)[0]
    lstm = model.cores[0].controllers[0]
    with torch.no_grad():
        lstm.weight_ih_l0[:, 5:] = 0  # columns after the input width read r_{t-1}
    cut = model(x)[0]
    assert torch.allclose(full[:, 0], cut[:, 0])
    assert not torch.allclose(full[:, 1:], cut[:, 1:], atol=1e-4)


def test_deterministic_eval_and_repeated_calls():
    model = make().eval()
    x = sequence()
    assert torch.equal(model(x)[0], model(x)[0])
    assert torch.equal(make(seed=0)(x)[0], make(seed=0)(x)[0])


def test_batch_first_and_time_first_give_the_same_numbers():
    x = sequence()
    a = make(batch_first=True)(x)[0]
    b = make(batch_first=False)(x.transpose(0, 1))[0]
    assert torch.allclose(a, b.transpose(0, 1), atol=1e-6)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn", "ff"])
def test_one_call_equals_two_halves_with_state_passed_along(rnn_type):
    model = make(rnn_type=rnn_type, num_layers=2, num_writes=2).to(torch.float64).eval()
    x = sequence(steps=10, dtype=torch.float64)
    whole, whole_state = model(x)
    first, state = model(x[:, :5])
    second, second_state = model(x[:, 5:], state)
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-10)
    assert torch.allclose(second_state[1]["link_matrix"], whole_state[1]["link_matrix"], atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("shape,checkpoint_steps", [
    (dict(num_layers=2, dropout=0.2), 1),  # checkpointed chunks of steps, through autograd
    (dict(num_layers=2, dropout=0.2), 3),
    (dict(num_layers=1, dropout=0.0), 4),  # native: the whole-sequence path (link matrices recomputed)
])
def test_checkpoint_steps_gives_the_same_values_and_gradients(shape, checkpoint_steps, backend):
    x = sequence(steps=8, dtype=torch.float64)
    results = []
    for k in (0, checkpoint_steps):
        model = make(**shape, checkpoint_steps=k, backend=backend).to(torch.float64)
        torch.manual_seed(7)  # the same dropout masks; checkpointing replays them in the backward pass
        output, (_, memory, _) = model(x)
        (output.pow(2).sum() + memory["link_matrix"].sum()).backward()
        results.append((output.detach(), [p.grad for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-12, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-10, rtol=0) for a, b in zip(grads_a, grads_b))


def test_samples_do_not_influence_each_other():
    model = make().to(torch.float64).eval()
    x = sequence(batch=4, dtype=torch.float64).requires_grad_(True)
    output = model(x)[0]
    output[1].sum().backward()
    grad = x.grad.abs().sum(dim=(1, 2))
    assert grad[1] > 0 and grad[[0, 2, 3]].max() == 0
    changed = x.detach().clone()
    changed[2] += 1.0
    assert torch.equal(model(changed)[0][[0, 1, 3]], output.detach()[[0, 1, 3]])


def test_bidirectional_sees_the_future_and_unidirectional_does_not():
    x = sequence()
    later = x.clone()
    later[:, -1] += 1.0
    for bidirectional, sees_future in ((False, False), (True, True)):
        model = make(bidirectional=bidirectional).eval()
        a, b = model(x)[0][:, 0], model(later)[0][:, 0]
        assert torch.allclose(a, b) != sees_future
    model = make(bidirectional=True)
    output, (hidden, memory, reads) = model(x)
    assert output.shape == (3, 8, 5) and len(memory) == 2 and reads[1].shape == (3, 8)
    again, _ = model(x, (hidden, memory, reads))  # its state can be passed back in
    assert again.shape == output.shape


COMBINATIONS = list(itertools.product(["lstm", "gru", "rnn", "ff"], [True, False], [True, False], [True, False]))


@pytest.mark.parametrize("rnn_type,share_memory,independent_linears,batch_first", COMBINATIONS)
def test_every_configuration_runs_forward_and_backward(rnn_type, share_memory, independent_linears, batch_first):
    model = make(rnn_type=rnn_type, num_layers=2, share_memory=share_memory,
                 independent_linears=independent_linears, batch_first=batch_first, dropout=0.1)
    x = sequence(steps=4)
    if not batch_first:
        x = x.transpose(0, 1)
    output, _ = model(x)
    output.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 1000])
def test_no_nan_or_inf_over_300_steps_from_zero_memory(batch):
    torch.manual_seed(0)
    model = DNC(input_size=6, hidden_size=16, nr_cells=8, cell_size=6, read_heads=2, num_hidden_layers=1)
    x = torch.randint(0, 2, (batch, 300, 6), generator=torch.Generator().manual_seed(0)).float()
    output, (_, memory, _) = model(x)
    torch.nn.functional.binary_cross_entropy_with_logits(output, x).backward()
    assert torch.isfinite(output).all()
    assert all(torch.isfinite(v).all() for v in memory.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    cpu = make()
    gpu = make(gpu_id=0)
    x = sequence()
    out_cpu = cpu(x)[0]
    out_gpu, (_, memory, reads) = gpu(x.cuda())
    assert out_gpu.is_cuda and memory["link_matrix"].is_cuda and reads.is_cuda
    assert torch.allclose(out_cpu, out_gpu.cpu(), atol=1e-4)
    moved = make().to("cuda:0")
    assert moved(x.cuda())[0].is_cuda
