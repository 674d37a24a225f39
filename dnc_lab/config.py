"""The experiment configuration: a typed schema, YAML loading, ``--set`` overrides, validation.

A config file has four sections, each a dataclass below:

    model:  the keywords of ``dnc_lab.DNC`` (same names); input_size/output_size follow from the task
    task:   ``name`` picks a task from ``dnc_lab.tasks.TASKS``; the other keys are that task's
    train:  optimiser, batch, steps, clipping, summaries, checkpoints, seed
    viz:    live Visdom streaming

Every value is checked against its field's type and range; an error names where the value came
from (the file or the ``--set`` option), the key, the bad value and what is allowed. Files are read
with ``yaml.safe_load`` only. ``--set section.key=value`` values are parsed as YAML scalars, so
``--set train.lr=3e-4`` is a float and ``--set viz.enabled=false`` a bool.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import click
import yaml

from dnc_lab.tasks import TASKS, TaskConfig, make_task
from dnc_lab.tasks.base import setting


class ConfigError(click.ClickException):
    """A bad config value, file or override: a usage error (exit code 2), shown as one line."""

    exit_code = 2


_f = setting  # a dataclass field with help text and limits (see dnc_lab.tasks.base)


# Keywords of DNC.__init__ that the runner sets itself, and why: reported when a config sets them.
MODEL_KEYS_SET_BY_RUNNER = {
    "gpu_id": "the device is chosen with `dnclab train --cuda N`",
    "device": "the device is chosen with `dnclab train --cuda N`",
    "batch_first": "the runner always feeds [batch, time, features]",
    "debug": "the runner records memory views with model.trace() at summaries",
}


# Model options of earlier versions: (their off value, why they went). A run folder written then
# holds them with the off value, which is accepted and dropped.
REMOVED_MODEL_KEYS = {
    "fused_link": (0, "the native backend (backend: auto) is faster and leaner; see benchmarks/RESULTS.md"),
    "compile_step": (False, "the native backend (backend: auto) is faster; see benchmarks/RESULTS.md"),
}


@dataclass
class ModelConfig:
    """Keywords passed to ``dnc_lab.DNC`` (see its docstring for their meaning)."""

    input_size: Optional[int] = _f(None, "set from the task; leave it out", min=1)
    output_size: Optional[int] = _f(None, "set from the task; leave it out", min=1)
    hidden_size: int = _f(64, "units per controller layer", min=1)
    rnn_type: Literal["lstm", "gru", "rnn", "ff"] = _f("lstm", "controller cell type")
    num_layers: int = _f(1, "DNC layers (each with its own controller)", min=1)
    num_hidden_layers: int = _f(1, "recurrent layers inside each controller", min=1)
    bias: bool = _f(True, "biases in the controller")
    dropout: float = _f(0.0, "dropout between controller layers", min=0.0, lt=1.0)
    bidirectional: bool = _f(False, "run a second DNC backwards in time")
    nr_cells: int = _f(16, "memory slots N", min=1)
    read_heads: int = _f(1, "read heads R", min=1)
    cell_size: int = _f(16, "width W of a memory slot", min=1)
    nonlinearity: Literal["tanh", "relu"] = _f("tanh", "for rnn_type 'rnn' and 'ff'")
    independent_linears: bool = _f(False, "one linear layer per interface part")
    share_memory: bool = _f(True, "layers share one memory")
    clip: float = _f(20.0, "clip controller outputs to [-clip, clip]; 0 disables", min=0.0)
    num_writes: int = _f(1, "write heads", min=1)
    checkpoint_steps: int = _f(0, "keep the recurrent state every this many steps for backward and "
                                  "recompute the rest (less memory, more time); 0 keeps all", min=0)
    backend: Literal["auto", "reference", "native", "triton"] = _f(
        "auto", "memory-step kernels (dnc_lab/backends/): auto takes the fastest that supports the model, "
                "dtype and device (native C++ on a CPU, Triton on a GPU), else the reference; same numbers")
    native: Optional[bool] = _f(None, "earlier name: true means backend: native, false backend: reference")
    # Csordás & Schmidhuber (ICLR 2019). A backend whose kernels lack one is passed over (auto says why).
    masked_lookup: bool = _f(False, "masked content lookup: a sigmoid mask per head multiplies key and memory "
                                    "rows before the cosine similarity")
    mask_min: float = _f(0.0, "floor of the lookup masks (the paper: 0.1); needs masked_lookup", min=0.0, lt=1.0)
    deallocation: bool = _f(False, "de-allocation erases memory: the retention vector also scales the cells")
    link_sharpness: bool = _f(False, "sharpen the forward/backward link weightings with a learned exponent "
                                     "per read head and direction")


@dataclass
class TrainConfig:
    """How to train: optimiser, batches, length of the run, summaries and checkpoints."""

    optimizer: Literal["adam", "rmsprop", "sgd"] = _f("adam", "sgd tends to make DNCs diverge")
    lr: float = _f(1e-3, "learning rate", gt=0.0)
    eps: Optional[float] = _f(None, "optimiser epsilon; default: adam/rmsprop 1e-8, rmsprop tf_style 1e-10", gt=0.0)
    momentum: float = _f(0.0, "rmsprop and sgd momentum", min=0.0, lt=1.0)
    rmsprop_alpha: Optional[float] = _f(None, "rmsprop decay; default 0.99, or 0.9 with tf_style", gt=0.0, lt=1.0)
    tf_style: bool = _f(False, "rmsprop as in TensorFlow 1 / deepmind/dnc: decay 0.9, eps inside the "
                               "square root, mean square initialised to 1")
    weight_decay: float = _f(0.0, "L2 penalty", min=0.0)
    batch_size: int = _f(32, "sequences per step (the seed project recommends 1000 on a GPU)", min=1)
    steps: int = _f(2000, "optimiser steps in the whole run", min=1)
    clip: float = _f(10.0, "clip the gradient's global norm to this; 0 disables", min=0.0)
    summarize_freq: int = _f(50, "steps between metrics lines (and Visdom updates)", min=1)
    check_freq: int = _f(250, "steps between checkpoints", min=1)
    keep_checkpoints: int = _f(3, "checkpoints kept (the newest)", min=1)
    seed: int = _f(0, "seeds the model, the data and every other RNG", min=0)
    max_nonfinite: int = _f(20, "stop after this many non-finite losses/gradients in a row", min=1)
    target_ber: Optional[float] = _f(None, "stop early once a summary's BER is at most this "
                                           "(at full curriculum length)", min=0.0, max=1.0)
    max_seconds: Optional[float] = _f(None, "stop (with a checkpoint) after this much training time", gt=0.0)
    eval_batch_size: int = _f(200, "sequences per length for the final evaluation", min=1)
    threads: Optional[int] = _f(None, "CPU threads for torch (torch.set_num_threads); default: torch's. "
                                      "1 is often fastest for small models on a shared machine", min=1)
    cuda_graph: bool = _f(False, "CUDA only (no effect on the CPU): capture the whole training step once as a "
                                 "CUDA graph and replay it; every batch is padded to the task's longest "
                                 "sequence, so short curriculum lengths cost as much as the longest")
    tf32: bool = _f(False, "CUDA only: float32 matrix products in TF32 (10-bit mantissa, faster on recent "
                           "GPUs): the controller's and output layer's, and the memory step's where it uses "
                           "torch's products (reference backend); false keeps full float32")


@dataclass
class VizConfig:
    """Live Visdom dashboard (see dnc_lab.viz); every event is also logged to the run folder."""

    enabled: bool = _f(True, "stream to Visdom while training")
    server: str = _f("http://localhost", "Visdom server address")
    port: int = _f(8097, "Visdom server port", min=1, max=65535)
    env: Optional[str] = _f(None, "Visdom env; default: the run id with '_' replaced by '-'")
    queue_size: int = _f(64, "events waiting to be sent before old ones are dropped", min=1)
    timeout_s: float = _f(2.0, "bound on every request to the server", gt=0.0)


@dataclass
class Config:
    model: ModelConfig
    task: TaskConfig
    train: TrainConfig
    viz: VizConfig

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-safe), in schema order."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``dnc_lab.DNC``, input/output sizes included."""
        return dataclasses.asdict(self.model)


SECTIONS = ("model", "task", "train", "viz")
_SECTION_CLASSES = {"model": ModelConfig, "train": TrainConfig, "viz": VizConfig}


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``--set section.key=value`` overrides, validate, resolve.

    Raises ConfigError naming the file (or override), key, bad value and what is allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found" + ("" if not path.is_dir() else " (it is a folder)"))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    return config_from_dict(raw, source=str(path), overrides=overrides)


def config_from_dict(raw: Any, source: str = "<config>", overrides: typing.Sequence[str] = ()) -> Config:
    """Validate a nested dict (as read from YAML) plus overrides into a resolved Config."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {list(SECTIONS)}, got {type(raw).__name__}")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    origin: dict[tuple[str, str], str] = {}  # (section, key) -> where the value came from
    for item in overrides:
        section, key, value = parse_override(item)
        if section not in raw or raw[section] is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {raw[section]!r}")
        raw[section][key] = value
        origin[(section, key)] = f"--set {item}"

    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {name!r}{_suggest(name, SECTIONS)}; "
                              f"allowed: {', '.join(SECTIONS)}")
    sections = {}
    for name in SECTIONS:
        data = raw.get(name) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping of keys to values, got {data!r}")
        where = lambda key, _n=name: origin.get((_n, key), source)  # noqa: E731
        if name == "task":
            sections[name] = _build_task(data, where)
        else:
            if name == "model":
                for key, why in MODEL_KEYS_SET_BY_RUNNER.items():
                    if key in data:
                        raise ConfigError(f"{where(key)}: model.{key} cannot be set in a config: {why}")
            sections[name] = _build(_SECTION_CLASSES[name], name, data, where)
    cfg = Config(**sections)
    _resolve_model_sizes(cfg, lambda key: origin.get(("model", key), source))
    _check_backend(cfg.model, lambda key: origin.get(("model", key), source))
    if cfg.model.mask_min and not cfg.model.masked_lookup:
        raise ConfigError(f"{origin.get(('model', 'mask_min'), source)}: model.mask_min = {cfg.model.mask_min} "
                          "has no effect without model.masked_lookup: true")
    return cfg


def parse_override(item: str) -> tuple[str, str, Any]:
    """``"train.lr=3e-4"`` -> ("train", "lr", 0.0003); the value is parsed as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=3e-4")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: the key must be section.key with a section in "
                          f"{list(SECTIONS)}, e.g. train.lr")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(f"--set {item!r}: unknown section {section!r}{_suggest(section, SECTIONS)}; "
                          f"allowed: {', '.join(SECTIONS)}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {item!r}: {text!r} is not a YAML scalar") from None
    if isinstance(value, (dict, list)):
        raise ConfigError(f"--set {item!r}: expected a single value (number, string, true/false, null), "
                          f"got a {type(value).__name__}")
    return section, key, value


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    text = "# Resolved config of this run (defaults filled in, overrides applied).\n"
    text += yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
    path.write_text(text)


# ---------------------------------------------------------------------------------------------
# Validation helpers


def _build_task(data: dict, where) -> TaskConfig:
    if "name" not in data:
        raise ConfigError(f"{where('name')}: task.name is required; allowed: {', '.join(TASKS)}")
    name = data["name"]
    if isinstance(name, str):
        name = name.replace("-", "_")
    if name not in TASKS:
        raise ConfigError(f"{where('name')}: task.name = {data['name']!r} is not a task{_suggest(str(name), TASKS)}; "
                          f"allowed: {', '.join(TASKS)}")
    cfg = _build(TASKS[name].Config, "task", {**data, "name": name}, where)
    try:
        cfg.check()
    except ValueError as e:
        raise ConfigError(f"{where('name')}: task: {e}") from None
    return cfg


def _build(cls: type, section: str, data: dict, where) -> Any:
    """Construct dataclass ``cls`` from ``data``, checking keys, types and limits."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if section == "model" and key in REMOVED_MODEL_KEYS:
            default, why = REMOVED_MODEL_KEYS[key]
            if value == default:  # written by an earlier version into a run's config.yaml: harmless
                continue
            raise ConfigError(f"{where(key)}: model.{key} = {value!r} no longer exists: {why}; delete the key")
        if key not in fields:
            raise ConfigError(f"{where(key)}: unknown key {section}.{key}{_suggest(str(key), fields)}; "
                              f"allowed: {', '.join(fields)}")
        values[key] = _check_value(value, hints[key], fields[key], f"{where(key)}: {section}.{key} = {value!r}")
    return cls(**values)


def _check_value(value: Any, hint: Any, f: dataclasses.Field, prefix: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{prefix}: expected one of {', '.join(map(repr, args))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{prefix}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{prefix}: expected an integer")
    elif hint is float:
        # PyYAML reads 1e-3 (no dot) as a string; accept any string float() understands.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{prefix}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{prefix}: expected a number")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{prefix}: expected a finite number")
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{prefix}: expected a string")
        return value
    m = f.metadata
    checks = [("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
              ("gt", lambda v, b: v > b, ">"), ("lt", lambda v, b: v < b, "<")]
    limits = [f"{sym} {m[k]}" for k, _, sym in checks if k in m]
    for key, ok, _ in checks:
        if key in m and not ok(value, m[key]):
            raise ConfigError(f"{prefix}: expected a value {' and '.join(limits)}")
    return value


def _resolve_model_sizes(cfg: Config, where) -> None:
    """model.input_size/output_size follow from the task; a conflicting value is an error."""
    try:
        task = make_task(cfg.task, "cpu")  # bAbI reads its files here: a bad file is a config error
    except ValueError as e:
        raise ConfigError(f"{where('name')}: task: {e}") from None
    for key, needed in (("input_size", task.input_size), ("output_size", task.output_size)):
        given = getattr(cfg.model, key)
        if given is not None and given != needed:
            raise ConfigError(f"{where(key)}: model.{key} = {given} conflicts with task {cfg.task.name!r}, "
                              f"which needs {needed}; remove the key (it follows from the task)")
        setattr(cfg.model, key, needed)


def _check_backend(model: ModelConfig, where) -> None:
    """model.native (the earlier key) must agree with model.backend when both are given."""
    if model.native is None:
        return
    alias = "native" if model.native else "reference"
    if model.backend not in ("auto", alias):
        raise ConfigError(f"{where('native')}: model.native = {str(model.native).lower()} means backend: {alias}, "
                          f"but model.backend = {model.backend}; keep only model.backend")


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
