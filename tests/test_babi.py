"""bAbI: the reader on small files written in the official format (the release cannot be
downloaded here), splits, batches, the paper's evaluation, the categorical loss, and a short
training run through the CLI with one-hot and with learned-embedding inputs."""

import json
import tarfile

import pytest
import torch
import yaml
from click.testing import CliRunner

from dnc_lab.cli import main
from dnc_lab.config import ConfigError, config_from_dict
from dnc_lab.embedding import Embedded
from dnc_lab.runs import load_run
from dnc_lab.tasks.babi import BabiConfig, BabiTask, load_babi, parse_stories, task_numbers
from dnc_lab.training import BITS, CLASSES, class_errors, masked_cross_entropy, objective_for
from babi_fixtures import QA1, QA8, write_release


@pytest.fixture
def release(tmp_path):
    return write_release(tmp_path, tasks=(1, 8))


def test_parse_one_story_word_by_word():
    (story, second) = parse_stories(QA1, task=1, think_steps=1)
    words = "mary moved to the bathroom . john went to the hallway . where is mary ?".split()
    assert story.words[:16] == words and story.words[16:18] == [None, "-"]
    assert story.answers[17] == "bathroom" and story.answers[:17] == [None] * 17
    assert story.question[17] == 0 and story.question[:17] == [-1] * 17
    assert story.words[-2:] == [None, "-"] and story.answers[-1] == "hallway" and story.question[-1] == 1
    assert second.words == "sandra journeyed to the kitchen . where is sandra ?".split() + [None, "-"]
    (lists, _) = parse_stories(QA8, task=8, think_steps=0)
    assert lists.words[-3:] == ["?", "-", "-"] and lists.answers[-2:] == ["football", "apple"]
    assert lists.question[-2:] == [0, 0]  # two answer words, one question


def test_release_folder_and_tarball_read_the_same(release, tmp_path):
    tarball = tmp_path / "tasks_1-20_v1-2.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(release, arcname="tasks_1-20_v1-2")
    a = load_babi(str(release), "en-10k", "1,8", 0, 0.1, 0)
    b = load_babi(str(tarball), "en-10k", "1,8", 0, 0.1, 0)
    c = load_babi(str(release / "en-10k"), "en-10k", "1,8", 0, 0.1, 0)  # the subset folder itself
    assert a.vocabulary.words == b.vocabulary.words == c.vocabulary.words
    assert a.splits == b.splits == c.splits
    assert "zebra" not in a.vocabulary.index  # the en subset was not read
    assert {".", "?", "-", "football", "apple", "office"} <= set(a.vocabulary.words)  # test words too
    assert a.vocabulary.words == sorted(a.vocabulary.words)


def test_split_holds_out_ten_percent_of_each_tasks_training_stories(release):
    data = load_babi(str(release), "en-10k", "1,8", 0, 0.1, 0)
    # 10 copies: task 1 has 20 training stories, task 8 has 20: 2 + 2 held out
    assert len(data.splits["validation"]) == 4 and len(data.splits["train"]) == 36
    assert [s.task for s in data.splits["validation"]].count(1) == 2
    assert len(data.splits["test"]) == 2
    assert load_babi(str(release), "en-10k", "1,8", 0, 0.1, 0).splits == data.splits  # fixed by split_seed


def test_batch_is_one_hot_with_answers_masked(release):
    task = BabiTask(BabiConfig(path=str(release), tasks="1,8", think_steps=2))
    b = task.sample(6, torch.Generator().manual_seed(0))
    V = len(task.vocabulary)
    assert task.input_size == task.output_size == V and b.inputs.shape[2] == V and b.targets.shape[2] == V
    for i, n in enumerate(b.lengths.tolist()):
        words = b.inputs[i].sum(-1)
        assert (words[:n] <= 1).all() and (b.inputs[i, n:] == 0).all()  # one-hot, blank, padding
        answer_steps = b.mask[i].nonzero().flatten()
        dash = task.vocabulary.index["-"]
        assert (b.inputs[i, answer_steps, dash] == 1).all()
        firsts = [t for t in answer_steps.tolist() if b.mask[i, t - 1] == 0]  # a question's first answer step
        assert (b.inputs[i, [t - 1 for t in firsts]].sum(-1) == 0).all()  # two blank think steps ...
        assert (b.inputs[i, [t - 2 for t in firsts]].sum(-1) == 0).all()
        assert (b.inputs[i, [t - 3 for t in firsts], task.vocabulary.index["?"]] == 1).all()  # ... after the '?'

        assert (b.targets[i].sum(-1) == b.mask[i]).all()  # a one-hot target exactly where masked
    a = task.sample(6, torch.Generator().manual_seed(0))
    assert torch.equal(a.inputs, b.inputs)
    assert objective_for(task) is CLASSES and objective_for(object()) is BITS  # a softmax over words
    with pytest.raises(ValueError, match="own lengths"):
        task.sample(2, torch.Generator(), length=3)


class AlwaysSays:
    """A 'model' that answers every step with one word."""

    def __init__(self, task, word):
        self.index = task.vocabulary.index[word]

    def __call__(self, inputs):
        logits = torch.zeros(*inputs.shape[:2], inputs.shape[2])
        logits[..., self.index] = 1.0
        return logits, None


def test_evaluate_counts_a_question_right_only_if_every_word_is(release):
    task = BabiTask(BabiConfig(path=str(release), tasks="1,8"))
    # Test set: task 1 asks "office"; task 8 asks "milk, football".
    report = task.evaluate(AlwaysSays(task, "office"), "test", batch_size=1)
    assert [(t.task, t.questions, t.wrong) for t in report.per_task] == [(1, 1, 0), (8, 1, 1)]
    report = task.evaluate(AlwaysSays(task, "milk"), "test")  # first word right, second wrong
    assert [(t.task, t.wrong) for t in report.per_task] == [(1, 1), (8, 1)]
    assert report.mean_error == 1.0 and report.failed == [1, 8]
    # Validation: count by a loop over the held-out stories' answer words.
    report = task.evaluate(AlwaysSays(task, "hallway"), "validation")
    expected = {1: [0, 0], 8: [0, 0]}
    for s in task.data.splits["validation"]:
        for q in set(q for q in s.question if q >= 0):
            words = [a for a, qq in zip(s.answers, s.question) if qq == q]
            expected[s.task][0] += 1
            expected[s.task][1] += any(w != "hallway" for w in words)
    assert [(t.task, t.questions, t.wrong) for t in report.per_task] == [(k, *v) for k, v in expected.items()]
    assert report.failed == [t.task for t in report.per_task if t.wrong / t.questions > 0.05]


def test_categorical_loss_and_errors():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0]]], dtype=torch.float64)
    targets = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 0, 0]]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    expected = torch.nn.functional.cross_entropy(logits[0, :2], torch.tensor([0, 0]))
    assert torch.allclose(masked_cross_entropy(logits, targets, mask), expected, rtol=0, atol=1e-12)
    wrong, counted = class_errors(logits, targets, mask)
    assert (wrong.item(), counted.item()) == (1.0, 2.0)


@pytest.mark.parametrize("settings, message", [
    ({"path": ""}, "path is empty: set task.path"),
    ({"path": "/nonexistent/babi"}, "does not exist; get the official release"),
    ({"tasks": "0-3"}, "'0-3' is not within the bAbI tasks 1-20"),
    ({"tasks": "one"}, "expected task numbers like 1-20"),
    ({"tasks": "2"}, "bAbI task 2 has no train file"),
    ({"subset": "hn"}, "no bAbI files .* of subset 'hn'"),
    ({"curriculum": True}, "bAbI has no length curriculum"),
])
def test_config_errors(release, settings, message):
    task = {"name": "babi", "path": str(release), "tasks": "1,8", **settings}
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"task": task})


def test_task_numbers():
    assert task_numbers("1-3,7") == [1, 2, 3, 7] and task_numbers("1-20") == list(range(1, 21))


def status_vocabulary(run) -> int:
    """The vocabulary size the run was configured with (model.input_size follows the task)."""
    return yaml.safe_load((run / "config.yaml").read_text())["model"]["input_size"]


@pytest.mark.parametrize("embedding", [0, 6])
def test_train_and_eval_through_the_cli(release, tmp_path, monkeypatch, embedding):
    monkeypatch.setenv("DNCLAB_EXPERIMENTS", str(tmp_path / "exp"))
    torch.set_num_threads(1)
    config = tmp_path / "babi.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"hidden_size": 8, "nr_cells": 4, "cell_size": 4, "read_heads": 1},
        "task": {"name": "babi", "path": str(release), "tasks": "1,8", "think_steps": 1,
                 "embedding_size": embedding},
        "train": {"batch_size": 4, "steps": 4, "summarize_freq": 2, "check_freq": 4, "eval_batch_size": 8,
                  "lr": 1e-2},
        "viz": {"enabled": False}}))
    runner = CliRunner()
    result = runner.invoke(main, ["train", str(config), "--run-id", "b", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "validation error per task: 1:" in result.output
    run = tmp_path / "exp" / "b"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and 0 <= metrics[-1]["ber"] <= 1 and metrics[-1]["loss"] > 0
    status = json.loads((run / "status.json").read_text())
    assert set(status["eval"]) == {"1", "8"}
    model, _ = load_run(run)
    if embedding:  # a learned [vocabulary -> 6] table in front of a DNC that takes 6 inputs
        assert isinstance(model, Embedded) and model.embed.weight.shape == (6, status_vocabulary(run))
        assert model.dnc.input_size == 6
    else:
        assert not isinstance(model, Embedded) and model.input_size == status_vocabulary(run)
    result = runner.invoke(main, ["eval", "--run", "b"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split()[:1] == ["8"] for line in lines) and "mean error" in result.output
    assert "failed tasks (error > 5%)" in result.output
    result = runner.invoke(main, ["eval", "--run", "b", "--lengths", "1-8"])
    assert result.exit_code == 2 and "--lengths does not apply to task 'babi'" in result.output
