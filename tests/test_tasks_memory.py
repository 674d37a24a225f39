"""Associative recall, priority sort and key-value retrieval: every target checked against an
independent per-sequence loop over the input (what the task definition says the answer is),
masks, padding, seeding, and config errors."""

import math

import pytest
import torch

from dnc_lab.config import ConfigError, config_from_dict
from dnc_lab.tasks import TASKS, make_task
from dnc_lab.tasks.associative_recall import AssociativeRecallConfig, AssociativeRecallTask
from dnc_lab.tasks.key_value import KeyValueConfig, KeyValueTask
from dnc_lab.tasks.priority_sort import PrioritySortConfig, PrioritySortTask


def steps(x: torch.Tensor) -> list[tuple]:
    """Rows of a [T, C] tensor as tuples (hashable)."""
    return [tuple(row.tolist()) for row in x]


# ----------------------------------------------------------------------------- associative recall


def recall_answer(inputs: torch.Tensor, bits: int, k: int) -> tuple[list[tuple], int]:
    """From one sequence's input [T, bits+2] alone: (the item after the queried one, the step where
    the answer starts), by reading the delimiters."""
    item_starts = (inputs[:, bits] == 1).nonzero().flatten().tolist()
    items = [steps(inputs[s + 1:s + 1 + k, :bits]) for s in item_starts]
    q_open, q_close = (inputs[:, bits + 1] == 1).nonzero().flatten().tolist()
    assert q_close - q_open == k + 1
    query = steps(inputs[q_open + 1:q_close, :bits])
    position = items.index(query)  # the first equal item: the sizes here make repeats improbable
    return items[position + 1], q_close + 1


def test_associative_recall_matches_a_loop_over_the_input():
    cfg = AssociativeRecallConfig(bits=5, item_length=3, min_length=2, max_length=6)
    task = AssociativeRecallTask(cfg)
    b = task.sample(64, torch.Generator().manual_seed(1))
    k, T = 3, 6 * 4 + 2 * 3 + 2
    assert b.inputs.shape == (64, T, 7) and b.targets.shape == (64, T, 5) and b.mask.shape == (64, T)
    assert (task.input_size, task.output_size) == (7, 5)
    assert set(b.lengths.tolist()) == {2, 3, 4, 5, 6}
    queried = set()
    for i, n in enumerate(b.lengths.tolist()):
        answer, start = recall_answer(b.inputs[i], 5, k)
        assert (b.inputs[i, :, 5] == 1).sum() == n  # n item delimiters
        assert b.mask[i].nonzero().flatten().tolist() == list(range(start, start + k))
        assert steps(b.targets[i, start:start + k]) == answer
        assert b.targets[i].sum() == b.targets[i, start:start + k].sum()  # nothing outside the answer
        assert b.inputs[i, start:].abs().sum() == 0  # blank answer phase and padding
        items = [steps(b.inputs[i, s + 1:s + 1 + k, :5]) for s in range(0, n * (k + 1), k + 1)]
        queried.add((n, items.index(answer) - 1))
    assert {q for n, q in queried if n == 6} >= {0, 4}  # every position but the last can be asked


def test_associative_recall_needs_two_items():
    task = AssociativeRecallTask(AssociativeRecallConfig())
    with pytest.raises(ValueError, match="at least 2 items, got length = 1"):
        task.sample(2, torch.Generator(), length=1)
    assert task.sample(3, torch.Generator(), length=2).lengths.tolist() == [2, 2, 2]


# ----------------------------------------------------------------------------- priority sort


def test_priority_sort_matches_a_loop_over_the_input():
    cfg = PrioritySortConfig(bits=4, min_length=1, max_length=10, keep=0.8)
    b = PrioritySortTask(cfg).sample(64, torch.Generator().manual_seed(2))
    assert b.inputs.shape == (64, 10 + 1 + 8, 6) and b.targets.shape == (64, 19, 4)
    for i, L in enumerate(b.lengths.tolist()):
        x = b.inputs[i]
        assert (x[:, 5] == 1).nonzero().flatten().tolist() == [L]  # the end marker
        pairs = [(x[s, 4].item(), tuple(x[s, :4].tolist())) for s in range(L)]
        assert all(-1 <= p <= 1 for p, _ in pairs)
        K = math.ceil(0.8 * L - 1e-9)
        expected = [v for _, v in sorted(pairs, key=lambda pv: -pv[0])[:K]]
        assert b.mask[i].nonzero().flatten().tolist() == list(range(L + 1, L + 1 + K))
        assert steps(b.targets[i, L + 1:L + 1 + K]) == expected
        assert b.targets[i].sum() == b.targets[i, L + 1:L + 1 + K].sum()
        assert x[L + 1:].abs().sum() == 0


def test_priority_sort_keeps_the_ntm_papers_16_of_20():
    b = PrioritySortTask(PrioritySortConfig(max_length=20)).sample(2, torch.Generator(), length=20)
    assert b.mask.sum(dim=1).tolist() == [16, 16] and b.inputs.shape[1] == 20 + 1 + 16


# ----------------------------------------------------------------------------- key-value


def test_key_value_matches_a_dictionary_lookup():
    cfg = KeyValueConfig(bits=8, min_length=1, max_length=9)
    task = KeyValueTask(cfg)
    b = task.sample(64, torch.Generator().manual_seed(3))
    assert (task.input_size, task.output_size) == (9, 4)
    assert b.inputs.shape == (64, 20, 9) and b.targets.shape == (64, 20, 4)
    for i, n in enumerate(b.lengths.tolist()):
        x = b.inputs[i]
        assert (x[:, 8] == 1).nonzero().flatten().tolist() == [n, 2 * n + 1]
        table = {}
        for s in range(n):
            table[tuple(x[s, :4].tolist())] = tuple(x[s, 4:8].tolist())
        assert len(table) == n  # keys are distinct
        asked = steps(x[n + 1:2 * n + 1, :4])
        assert sorted(asked) == sorted(table)  # every key asked once
        assert x[n + 1:2 * n + 1, 4:].abs().sum() == 0  # queries carry no value
        assert steps(b.targets[i, n + 1:2 * n + 1]) == [table[key] for key in asked]
        assert b.mask[i].nonzero().flatten().tolist() == list(range(n + 1, 2 * n + 1))
        assert b.targets[i].sum() == b.targets[i, n + 1:2 * n + 1].sum() and x[2 * n + 2:].abs().sum() == 0


def test_key_value_two_way_asks_both_directions():
    cfg = KeyValueConfig(bits=6, min_length=1, max_length=8, two_way=True)
    task = KeyValueTask(cfg)
    b = task.sample(64, torch.Generator().manual_seed(4))
    assert (task.input_size, task.output_size) == (8, 3) and b.inputs.shape == (64, 27, 8)
    for i, n in enumerate(b.lengths.tolist()):
        x = b.inputs[i]
        assert (x[:, 6] == 1).nonzero().flatten().tolist() == [n, 3 * n + 2]
        assert (x[:, 7] == 1).nonzero().flatten().tolist() == [2 * n + 1, 3 * n + 2]
        forward = {tuple(x[s, :3].tolist()): tuple(x[s, 3:6].tolist()) for s in range(n)}
        backward = {v: k for k, v in forward.items()}
        assert len(forward) == len(backward) == n  # keys and values distinct
        keys_asked = steps(x[n + 1:2 * n + 1, :3])
        values_asked = steps(x[2 * n + 2:3 * n + 2, 3:6])
        assert sorted(keys_asked) == sorted(forward) and sorted(values_asked) == sorted(backward)
        assert x[2 * n + 2:3 * n + 2, :3].abs().sum() == 0  # value queries carry no key
        assert steps(b.targets[i, n + 1:2 * n + 1]) == [forward[k] for k in keys_asked]
        assert steps(b.targets[i, 2 * n + 2:3 * n + 2]) == [backward[v] for v in values_asked]
        answer_steps = list(range(n + 1, 2 * n + 1)) + list(range(2 * n + 2, 3 * n + 2))
        assert b.mask[i].nonzero().flatten().tolist() == answer_steps


def test_key_value_length_limit():
    task = KeyValueTask(KeyValueConfig(bits=4, max_length=4))
    assert task.sample(2, torch.Generator(), length=4).lengths.tolist() == [4, 4]
    with pytest.raises(ValueError, match=r"length = 5 pairs: expected 1 to 2\^\(bits/2\) = 4"):
        task.sample(2, torch.Generator(), length=5)


# ----------------------------------------------------------------------------- all three


CONFIGS = [AssociativeRecallConfig(max_length=4), PrioritySortConfig(max_length=6),
           KeyValueConfig(max_length=6), KeyValueConfig(max_length=6, two_way=True)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}{'-2way' if getattr(c, 'two_way', 0) else ''}")
def test_seeding_curriculum_cap_and_registry(cfg):
    task = make_task(cfg)
    assert TASKS[cfg.name] is type(task)
    a = task.sample(16, torch.Generator().manual_seed(7))
    b = task.sample(16, torch.Generator().manual_seed(7))
    c = task.sample(16, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.inputs, c.inputs)
    capped = task.sample(64, torch.Generator().manual_seed(7), max_length=cfg.min_length)
    assert capped.lengths.tolist() == [cfg.min_length] * 64
    assert capped.inputs.shape[1] < a.inputs.shape[1] or a.lengths.max() == cfg.min_length
    assert ((a.targets != 0).any(-1) <= (a.mask > 0)).all()  # targets only where the mask is on


@pytest.mark.parametrize("task, bad, message", [
    ({"name": "associative_recall", "min_length": 1}, "task.min_length = 1", "expected a value >= 2"),
    ({"name": "associative_recall", "item_length": 0}, "task.item_length = 0", ">= 1"),
    ({"name": "priority_sort", "keep": 0.0}, "task.keep = 0.0", "<= 1.0 and > 0.0"),
    ({"name": "priority_sort", "keep": 1.5}, "task.keep = 1.5", "<= 1.0 and > 0.0"),
    ({"name": "key_value", "bits": 7}, "bits = 7 must be even", "keys and values are bits/2 wide"),
    ({"name": "key_value", "bits": 4, "max_length": 5}, "max_length = 5 pairs", "give only 4"),
    ({"name": "key_value", "two_way": "yes"}, "task.two_way = 'yes'", "expected true or false"),
])
def test_config_errors(task, bad, message):
    with pytest.raises(ConfigError, match=f"{bad}.*{message}"):
        config_from_dict({"task": task})


def test_model_sizes_follow_the_task():
    cfg = config_from_dict({"task": {"name": "key_value", "bits": 6, "two_way": True, "max_length": 8}})
    assert (cfg.model.input_size, cfg.model.output_size) == (8, 3)
    cfg = config_from_dict({"task": {"name": "associative_recall", "bits": 4}})
    assert (cfg.model.input_size, cfg.model.output_size) == (6, 4)
