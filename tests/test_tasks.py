"""Tasks: inputs, targets and masks on small hand-checked examples; padding; seeding; curriculum."""

import torch

from dnc_lab.tasks import Curriculum, TASKS, make_task
from dnc_lab.tasks.copy import CopyConfig, CopyTask
from dnc_lab.tasks.repeat_copy import RepeatCopyConfig, RepeatCopyTask


def _fixed(task, pattern: torch.Tensor, **kwargs):
    """A batch of one sequence whose random bits are ``pattern`` (we replace the bit generator)."""
    import dnc_lab.tasks.copy as copy_module
    import dnc_lab.tasks.repeat_copy as repeat_module

    module = copy_module if isinstance(task, CopyTask) else repeat_module
    original = module.random_bits
    module.random_bits = lambda shape, generator, device: pattern.reshape(shape).float()
    try:
        return task.sample(1, torch.Generator(), **kwargs)
    finally:
        module.random_bits = original


def test_copy_hand_example():
    # bits=3: data channels 0..1, marker channel 2; L=2 vectors [1,0], [1,1].
    task = CopyTask(CopyConfig(bits=3, min_length=1, max_length=4))
    b = _fixed(task, torch.tensor([[1, 0], [1, 1]]), length=2)
    expected_inputs = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]], dtype=torch.float)
    expected_targets = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.float)
    assert torch.equal(b.inputs[0], expected_inputs)
    assert torch.equal(b.targets[0], expected_targets)
    assert b.mask[0].tolist() == [0, 0, 0, 1, 1]
    assert (task.input_size, task.output_size) == (3, 3)


def test_copy_padding_in_a_mixed_batch():
    task = CopyTask(CopyConfig(bits=4, min_length=1, max_length=5))
    b = task.sample(64, torch.Generator().manual_seed(3))
    assert b.inputs.shape == (64, 11, 4) and b.targets.shape == (64, 11, 4) and b.mask.shape == (64, 11)
    assert len(set(b.lengths.tolist())) > 1
    for i, L in enumerate(b.lengths.tolist()):
        assert b.mask[i].tolist() == [0.0] * (L + 1) + [1.0] * L + [0.0] * (10 - 2 * L)
        assert torch.equal(b.targets[i, L + 1:2 * L + 1, :3], b.inputs[i, :L, :3])  # the copy
        assert b.inputs[i, :, 3].nonzero().flatten().tolist() == [L]  # one marker, after the data
        assert b.inputs[i, L + 1:].abs().sum() == 0 and b.targets[i, 2 * L + 1:].abs().sum() == 0  # padding
        assert b.targets[i, :, 3].sum() == 0


def test_copy_series_hand_example():
    # bits=3, two problems (min=max=2 sequences), both of length 2: [1,0],[1,1] then [0,1],[0,0].
    task = CopyTask(CopyConfig(bits=3, min_length=2, max_length=2, min_sequences=2, max_sequences=2))
    b = _fixed(task, torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]]))
    data = [[1, 0], [1, 1], [0, 1], [0, 0]]
    expected_inputs = [data[0] + [0], data[1] + [0], [0, 0, 1], [0, 0, 0], [0, 0, 0],
                       data[2] + [0], data[3] + [0], [0, 0, 1], [0, 0, 0], [0, 0, 0]]
    expected_targets = [[0, 0, 0]] * 3 + [data[0] + [0], data[1] + [0]] + [[0, 0, 0]] * 3 + [data[2] + [0], data[3] + [0]]
    assert b.inputs[0].tolist() == expected_inputs
    assert b.targets[0].tolist() == expected_targets
    assert b.mask[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 1]
    assert b.lengths.tolist() == [2]


def test_copy_series_in_a_mixed_batch():
    """Every series: its problems one after another, each answered before the next, padding at the end."""
    task = CopyTask(CopyConfig(bits=4, min_length=1, max_length=4, min_sequences=1, max_sequences=3))
    b = task.sample(64, torch.Generator().manual_seed(5))
    counts, totals = [], []
    for i in range(64):
        markers = b.inputs[i, :, 3].nonzero().flatten().tolist()
        counts.append(len(markers))
        start, longest = 0, 0
        for marker in markers:  # problem: vectors start..marker-1, marker, then as many answer steps
            L = marker - start
            assert L >= 1
            longest = max(longest, L)
            assert b.mask[i, start:marker + 1].sum() == 0 and b.mask[i, marker + 1:marker + 1 + L].sum() == L
            assert torch.equal(b.targets[i, marker + 1:marker + 1 + L, :3], b.inputs[i, start:marker, :3])
            assert b.inputs[i, marker + 1:marker + 1 + L].abs().sum() == 0  # blank while answering
            start = marker + 1 + L
        totals.append(start)
        assert b.lengths[i] == longest
        assert b.mask[i, start:].sum() == 0 and b.inputs[i, start:].abs().sum() == 0  # padding
    assert set(counts) == {1, 2, 3} and b.inputs.shape[1] == max(totals)
    # A fixed length fixes every problem's length, not their number.
    fixed = task.sample(16, torch.Generator().manual_seed(6), length=5)
    assert (fixed.mask.sum(1) % 5 == 0).all() and fixed.lengths.tolist() == [5] * 16


def test_copy_with_one_sequence_draws_as_before():
    """max_sequences = 1 is the plain copy task, batch for batch (runs measured before the option stay valid)."""
    plain = CopyTask(CopyConfig(bits=5, max_length=6)).sample(8, torch.Generator().manual_seed(2))
    series = CopyTask(CopyConfig(bits=5, max_length=6, min_sequences=1, max_sequences=1)).sample(
        8, torch.Generator().manual_seed(2))
    assert all(torch.equal(x, y) for x, y in zip(plain, series))
    import pytest

    with pytest.raises(ValueError, match="min_sequences = 3 is larger than max_sequences = 2"):
        CopyConfig(min_sequences=3, max_sequences=2).check()


def test_repeat_copy_hand_example():
    # num_bits=2, L=2 pattern [1,1], [0,1], R=2 repeats (min=max=2), norm_max=10.
    task = RepeatCopyTask(RepeatCopyConfig(num_bits=2, min_length=1, max_length=2, min_repeats=2, max_repeats=2))
    b = _fixed(task, torch.tensor([[1, 1], [0, 1]]), length=2)
    o = 0.2  # the count channel: 2 / 10
    expected_inputs = torch.tensor(
        [[0, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, o]] + [[0, 0, 0, 0]] * 5)
    expected_targets = torch.tensor(
        [[0, 0, 0]] * 4 + [[1, 1, 0], [0, 1, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float)
    assert torch.allclose(b.inputs[0], expected_inputs.float())
    assert torch.equal(b.targets[0], expected_targets)
    assert b.mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert (task.input_size, task.output_size) == (4, 3)


def test_repeat_copy_mixed_batch_invariants():
    cfg = RepeatCopyConfig(num_bits=3, min_length=1, max_length=3, min_repeats=1, max_repeats=3, norm_max=5)
    b = RepeatCopyTask(cfg).sample(64, torch.Generator().manual_seed(0))
    for i, L in enumerate(b.lengths.tolist()):
        R = round(b.inputs[i, L + 1, 4].item() * 5)
        assert 1 <= R <= 3
        end = L + 2 + L * R
        assert b.mask[i].nonzero().flatten().tolist() == list(range(L + 2, end + 1))
        assert b.targets[i, :, 3].nonzero().flatten().tolist() == [end]  # end flag only at the end
        for r in range(R):
            assert torch.equal(b.targets[i, L + 2 + r * L:L + 2 + (r + 1) * L, :3], b.inputs[i, 1:L + 1, :3])
        assert b.targets[i, end + 1:].abs().sum() == 0 and b.inputs[i, L + 2:].abs().sum() == 0


def test_seeded_generator_reproduces_and_curriculum_caps_length():
    task = make_task(CopyConfig(bits=5, min_length=1, max_length=8))
    a = task.sample(8, torch.Generator().manual_seed(7))
    b = task.sample(8, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    capped = task.sample(50, torch.Generator().manual_seed(7), max_length=3)
    assert capped.lengths.max() <= 3 and capped.inputs.shape[1] == 7


def test_curriculum_grows_only_below_threshold():
    cur = Curriculum(CopyConfig(min_length=1, max_length=5, curriculum=True, curriculum_start=2,
                                curriculum_step=2, curriculum_threshold=0.05))
    assert cur.max_length == 2 and not cur.done
    assert not cur.update(0.2) and cur.max_length == 2
    assert cur.update(0.01) and cur.max_length == 4
    assert cur.update(0.0) and cur.max_length == 5 and cur.done
    restored = Curriculum(CopyConfig(max_length=5, curriculum=True))
    restored.load_state_dict(cur.state_dict())
    assert restored.max_length == 5
    assert Curriculum(CopyConfig(max_length=6)).max_length == 6  # off: always the full length


def test_registry():
    assert set(TASKS) == {"copy", "repeat_copy", "associative_recall", "priority_sort", "key_value", "babi"}
