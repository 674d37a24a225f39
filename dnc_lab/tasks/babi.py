"""bAbI question answering (Weston et al. 2015), as the DNC paper trained it (Graves et al. 2016,
Methods): all 20 tasks jointly, word by word.

The data is the official release ``tasks_1-20_v1-2`` (the folder, or ``tasks_1-20_v1-2.tar.gz``
unpacked in memory), subset ``en-10k`` by default: files ``<subset>/qa<N>_<name>_{train,test}.txt``
in which every line is ``<number> <sentence>`` and a question line is
``<number> <question>?<TAB><answer>[,<answer>...]<TAB><supporting fact numbers>``; the number
starts again at 1 with every new story. One story (with all its questions) is one sequence.

Each word is one time step, sentences end with a '.' step and questions with a '?' step; then
come ``think_steps`` blank steps (no word at all: a zero input) and one '-' step per answer word,
at which the model must output that answer word. Only the '-' steps are masked in. Example with
think_steps=1 ("1 mary went to the kitchen." / "2 where is mary?<TAB>kitchen<TAB>1"):

    t:       0    1    2  3   4       5  6     7  8    9  10      11
    input:   mary went to the kitchen .  where is mary ?  (blank) -
    target:                                                       kitchen
    mask:    0    0    0  0   0       0  0     0  0    0  0       1

Inputs are one-hot over the vocabulary (``input_size`` = its size; the DNC paper's had 159
symbols), and so are targets: the output is a word, scored with a softmax over the vocabulary
(``output_kind = "categorical"``: cross-entropy on the '-' steps; the error counts wrong words).
The vocabulary is every word of the chosen tasks' training and test files plus '.', '?' and '-',
sorted, lower-cased. ``embedding_size`` > 0 feeds the DNC a learned embedding of that width
instead (a bias-free linear layer on the one-hot vector, i.e. a lookup table trained with the
model; see ``dnc_lab.training.build_model``).

Splits: the official test file is the test set; of each task's training stories a fixed
``validation_fraction`` (10% by default, drawn with ``split_seed``) is held out for validation, as
in the DNC paper. ``evaluate`` reports the paper's figures: per-task error (a question is right
only if every one of its answer words is), the mean over tasks, and the failed tasks (error > 5%).

The natural length of a story is its number of words; sampling ignores ``max_length`` (stories are
what they are), so curriculum and ``dnclab eval --lengths`` do not apply.
"""

from __future__ import annotations

import math
import re
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import torch

from dnc_lab.tasks.base import Batch, TaskConfig, setting

RELEASE = "tasks_1-20_v1-2"
WHERE_TO_GET = ("get the official release tasks_1-20_v1-2.tar.gz from the bAbI project page "
                "(research.facebook.com/downloads/babi)")
ANSWER, QUESTION_END, SENTENCE_END = "-", "?", "."
FAIL_THRESHOLD = 0.05  # the bAbI convention: a task is failed above 5% error


@dataclass
class BabiConfig(TaskConfig):
    name: Literal["babi"] = setting("babi", "bAbI question answering, all chosen tasks jointly")
    path: str = setting("", f"folder or .tar.gz of the official {RELEASE} release (or its subset folder)")
    subset: str = setting("en-10k", "subfolder of the release: en-10k (10,000 stories per task) or en (1,000)")
    tasks: str = setting("1-20", "bAbI task numbers to train and evaluate on, e.g. 1-20 or 1,2,5")
    think_steps: int = setting(0, "blank steps between a question's '?' and its answer steps", min=0)
    validation_fraction: float = setting(0.1, "training stories of each task held out for validation",
                                         min=0.0, lt=1.0)
    split_seed: int = setting(0, "seed of the train/validation split (fixed: not the run's seed)", min=0)
    embedding_size: int = setting(0, "0: one-hot words into the DNC (the paper); n: a learned n-wide embedding",
                                  min=0)
    # Lengths do not apply to stories; kept only because every task has them.
    min_length: int = setting(1, "unused by bAbI (stories have their own length)", min=1)
    max_length: int = setting(1, "unused by bAbI (stories have their own length)", min=1)

    def check(self) -> None:
        if self.curriculum:
            raise ValueError("curriculum = true: bAbI has no length curriculum (stories have their own length)")
        super().check()
        task_numbers(self.tasks)
        if not self.path:
            raise ValueError(f"path is empty: set task.path to the {RELEASE} folder or tarball; {WHERE_TO_GET}")
        if not Path(self.path).expanduser().exists():
            raise ValueError(f"path = {self.path!r} does not exist; {WHERE_TO_GET}")


def task_numbers(text: str) -> list[int]:
    """``"1-3,7"`` -> [1, 2, 3, 7]; ValueError unless every number is a bAbI task (1-20)."""
    numbers: set[int] = set()
    for part in str(text).split(","):
        try:
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"tasks = {text!r}: expected task numbers like 1-20 or 1,2,5") from None
        if not 1 <= first <= last <= 20:
            raise ValueError(f"tasks = {text!r}: {part.strip()!r} is not within the bAbI tasks 1-20")
        numbers.update(range(first, last + 1))
    return sorted(numbers)


# ------------------------------------------------------------------------------ reading the files


class Story(NamedTuple):
    """One story as words: ``words[i]`` is the input at step i (None: a blank think step),
    ``answers[i]`` the word expected there (None: no answer), ``question[i]`` the number of the
    story's question that step answers (-1 elsewhere)."""

    task: int
    words: list
    answers: list
    question: list


_TOKEN_RE = re.compile(r"[a-z0-9]+|[.?]")


def tokens(text: str) -> list[str]:
    """Lower-cased words and the '.' / '?' marks of one line's text."""
    return _TOKEN_RE.findall(text.lower())


def parse_stories(text: str, task: int, think_steps: int) -> list[Story]:
    """The stories of one file in the official format (see the module docstring)."""
    stories: list[Story] = []
    words: list = []
    answers: list = []
    question: list = []
    asked = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        head, _, rest = line.strip().partition(" ")
        if not head.isdigit():
            raise ValueError(f"line {number}: expected '<number> <text>', got {line.strip()[:60]!r}")
        if int(head) == 1 and words:
            stories.append(Story(task, words, answers, question))
            words, answers, question, asked = [], [], [], 0
        fields = rest.split("\t")
        said = tokens(fields[0])
        if len(fields) >= 2:  # a question: text?, answer(s), supporting facts
            if not said or said[-1] != QUESTION_END:
                said.append(QUESTION_END)
            reply = [w for w in tokens(fields[1].replace(",", " ")) if w not in (".", "?")]
            if not reply:
                raise ValueError(f"line {number}: a question without an answer: {line.strip()[:60]!r}")
            steps = said + [None] * think_steps + [ANSWER] * len(reply)
            words += steps
            answers += [None] * (len(steps) - len(reply)) + reply
            question += [-1] * (len(steps) - len(reply)) + [asked] * len(reply)
            asked += 1
        else:
            if not said or said[-1] != SENTENCE_END:
                said.append(SENTENCE_END)
            words += said
            answers += [None] * len(said)
            question += [-1] * len(said)
    if words:
        stories.append(Story(task, words, answers, question))
    return stories


_FILE_RE = re.compile(r"qa(\d+)_[^/]*_(train|test)\.txt$")


@lru_cache(maxsize=4)
def read_release(path: str, subset: str) -> dict[tuple[int, str], str]:
    """{(task number, 'train' | 'test'): file text} of one subset of the release, from its folder,
    the folder of the subset itself, or the tarball. Cached: configs and runs read it once."""
    root = Path(path).expanduser()
    files: dict[tuple[int, str], str] = {}

    def keep(name: str, read) -> None:
        parts = name.replace("\\", "/").split("/")
        match = _FILE_RE.search(parts[-1])
        if match and len(parts) >= 2 and parts[-2] == subset:
            files[(int(match.group(1)), match.group(2))] = read()

    if root.is_dir():
        for file in sorted(root.rglob("qa*_*.txt")):
            keep(str(file.relative_to(root.parent)), lambda f=file: f.read_text(encoding="utf-8"))
    elif tarfile.is_tarfile(root):
        with tarfile.open(root) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    keep(member.name, lambda m=member: tar.extractfile(m).read().decode("utf-8"))
    else:
        raise ValueError(f"{root} is neither a folder nor a tar archive; {WHERE_TO_GET}")
    if not files:
        raise ValueError(f"no bAbI files qa<N>_*_train.txt / _test.txt of subset {subset!r} in {root} "
                         f"(expected {RELEASE}/{subset}/...); {WHERE_TO_GET}")
    return files


class Vocabulary:
    """Words <-> indices; sorted, so the same files always give the same indices."""

    def __init__(self, words):
        self.words = sorted(set(words) | {SENTENCE_END, QUESTION_END, ANSWER})
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)


class BabiData(NamedTuple):
    vocabulary: Vocabulary
    splits: dict  # "train" | "validation" | "test" -> list[Story]


@lru_cache(maxsize=4)
def load_babi(path: str, subset: str, tasks: str, think_steps: int, validation_fraction: float,
              split_seed: int) -> BabiData:
    """Read, split and index the chosen tasks (see the module docstring)."""
    files = read_release(path, subset)
    splits: dict[str, list[Story]] = {"train": [], "validation": [], "test": []}
    for task in task_numbers(tasks):
        for part in ("train", "test"):
            if (task, part) not in files:
                raise ValueError(f"bAbI task {task} has no {part} file in {path} (subset {subset!r}); "
                                 f"{WHERE_TO_GET}")
        train = parse_stories(files[(task, "train")], task, think_steps)
        held = math.floor(validation_fraction * len(train) + 0.5)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed * 100 + task))
        held_out = set(order[:held].tolist())
        splits["train"] += [s for i, s in enumerate(train) if i not in held_out]
        splits["validation"] += [s for i, s in enumerate(train) if i in held_out]
        splits["test"] += parse_stories(files[(task, "test")], task, think_steps)
    if not splits["train"]:
        raise ValueError(f"no training stories left for tasks {tasks!r} in {path}")
    vocabulary = Vocabulary(w for stories in splits.values() for s in stories
                            for w in s.words + s.answers if w is not None)
    return BabiData(vocabulary, splits)


# ------------------------------------------------------------------------------ batches, evaluation


class TaskError(NamedTuple):
    task: int
    questions: int
    wrong: int

    @property
    def error(self) -> float:
        return self.wrong / max(self.questions, 1)


class BabiReport(NamedTuple):
    """The DNC paper's figures for one split."""

    split: str
    per_task: list  # of TaskError, by task number

    @property
    def mean_error(self) -> float:
        return sum(t.error for t in self.per_task) / len(self.per_task)

    @property
    def failed(self) -> list[int]:
        return [t.task for t in self.per_task if t.error > FAIL_THRESHOLD]


class BabiTask:
    """Batches of bAbI stories (one-hot words) and the paper's evaluation."""

    Config = BabiConfig
    output_kind = "categorical"
    length_meaning = None  # stories have their own lengths: `dnclab eval --lengths` does not apply

    def __init__(self, cfg: BabiConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.data = load_babi(str(cfg.path), cfg.subset, cfg.tasks, cfg.think_steps, cfg.validation_fraction,
                              cfg.split_seed)
        self.vocabulary = self.data.vocabulary
        self.input_size = len(self.vocabulary)
        self.output_size = len(self.vocabulary)

    def batch(self, stories: list[Story]) -> tuple[Batch, torch.Tensor]:
        """(the batch of these stories, padded at the end; question [B, T], the number of the
        question each answer step belongs to, -1 elsewhere)."""
        V, T = len(self.vocabulary), max(len(s.words) for s in stories)
        index = self.vocabulary.index
        words = torch.full((len(stories), T), -1, dtype=torch.long)
        answers = torch.full((len(stories), T), -1, dtype=torch.long)
        question = torch.full((len(stories), T), -1, dtype=torch.long)
        for b, s in enumerate(stories):
            words[b, :len(s.words)] = torch.tensor([-1 if w is None else index[w] for w in s.words])
            answers[b, :len(s.words)] = torch.tensor([-1 if w is None else index[w] for w in s.answers])
            question[b, :len(s.words)] = torch.tensor(s.question)
        words, answers, question = words.to(self.device), answers.to(self.device), question.to(self.device)
        classes = torch.arange(V, device=self.device)
        inputs = (words[..., None] == classes).float()  # [B, T, V]; a blank or padding step is all zero
        targets = (answers[..., None] == classes).float()  # [B, T, V]
        mask = (answers >= 0).float()  # [B, T]
        lengths = torch.tensor([len(s.words) for s in stories], device=self.device)
        return Batch(inputs, targets, mask, lengths), question

    def sample(self, batch_size: int, generator: torch.Generator, max_length: Optional[int] = None,
               length: Optional[int] = None) -> Batch:
        """``batch_size`` training stories drawn uniformly (with replacement) from every chosen task."""
        if length is not None:
            raise ValueError("bAbI stories have their own lengths: there is no batch of a given length "
                             "(so no length evaluation, use BabiTask.evaluate, and no train.cuda_graph)")
        train = self.data.splits["train"]
        picks = torch.randint(0, len(train), (batch_size,), generator=generator, device=generator.device)
        return self.batch([train[i] for i in picks.tolist()])[0]

    @torch.no_grad()
    def evaluate(self, model, split: str = "test", batch_size: int = 50) -> BabiReport:
        """Per-task question error of ``model`` (a callable: one-hot inputs -> (logits, state)) on
        every story of ``split``. A question is right only if every answer word is."""
        stories = self.data.splits[split]
        if not stories:
            raise ValueError(f"the {split} split is empty (validation_fraction = {self.cfg.validation_fraction})")
        order = sorted(range(len(stories)), key=lambda i: len(stories[i].words))  # little padding
        totals: dict[int, list[int]] = {t: [0, 0] for t in task_numbers(self.cfg.tasks)}
        for start in range(0, len(order), batch_size):
            chunk = [stories[i] for i in order[start:start + batch_size]]
            batch, question = self.batch(chunk)
            logits, _ = model(batch.inputs)
            wrong_step = (logits.argmax(-1) != batch.targets.argmax(-1)) & (batch.mask > 0)  # [B, T]
            for b, story in enumerate(chunk):
                asked = int(question[b].max().item()) + 1
                on = question[b] >= 0
                wrong = torch.zeros(asked, dtype=torch.long, device=question.device)
                wrong.scatter_reduce_(0, question[b][on], wrong_step[b][on].long(), reduce="amax")
                totals[story.task][0] += asked
                totals[story.task][1] += int(wrong.sum().item())
        return BabiReport(split, [TaskError(t, q, w) for t, (q, w) in sorted(totals.items())])
