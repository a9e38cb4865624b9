"""``icl-kernels compare``: ICL vs finetuning (Dai et al.) with controls, end to end.

``icl-kernels compare --model M --task T --shots K --n-test N --seed S --out DIR`` builds episodes
(one set of K class-balanced demonstrations from the task's train split shared by N test queries,
as in the original; ``--episodes E`` draws E sets, each for a share of the queries), chooses the
finetuning learning rate on ``--n-dev`` development queries taken from the train split outside
every demonstration set (never the test split), finetunes the key/value projections on the
demonstrations, and runs `icl_kernels.compare.compare` on the trained model and on an untrained
model of the same architecture.

The synthetic-world model (``--model synthetic-gpt-neo``, or any model folder with a
``world.json``) has no text task: its task is the world itself (``--task synthetic``, the default
for such models). Each episode draws one latent concept (episode e uses concept e mod n_concepts),
K demonstrations ``x_i y_i`` and its queries and development queries from that concept; the
prompt is ``<d> x_1 y_1 <d> ... <d> x_K y_K <d> x`` and the zero-shot prompt ``<d> x``; the
delimiter plays the part of BOS. By default there is one episode per concept, so the metrics
average over concepts rather than depend on one.

Writes ``DIR/metrics.json`` (``zsl_accuracy ft_accuracy icl_accuracy rec2ftp rec2ftp_chance simaou
simaou_random simaou_untrained simam_before simam_after kendall kendall_random`` and more),
``layers.csv``, ``heads.csv``, ``examples.csv``, ``lr_search.csv``, ``config.json`` and HTML
figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from icl_kernels.io import write_csv, write_json

__all__ = [
    "CompareRunConfig",
    "SYNTHETIC_TASKS",
    "synthetic_world_of",
    "text_episodes",
    "synthetic_episodes",
    "compare_report",
    "add_compare_parser",
    "run_compare",
]

SYNTHETIC_TASKS = ("synthetic", "synthetic-world")


@dataclass
class CompareRunConfig:
    """Options of one ``compare`` run (see the module docstring)."""

    model: str = "gemma-3-270m"
    task: str | None = None  # None: the default text task, or the world of a synthetic model
    shots: int = 8
    n_test: int = 100
    seed: int = 0
    backend: str | None = None
    device: str | None = None
    dtype: str = "float32"
    position: str = "prediction"
    n_dev: int = 32
    episodes: int | None = None  # None: 1 for text tasks, one per concept for the synthetic world
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    lr: float | None = None
    untrained: bool = True
    direct: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        from icl_kernels.compare import POSITIONS

        problems = []
        if self.shots < 1:
            problems.append(f"shots must be >= 1 (finetuning needs demonstrations), not {self.shots}")
        if self.n_test < 1:
            problems.append(f"n_test must be >= 1, not {self.n_test}")
        if self.position not in POSITIONS:
            problems.append(f"position must be one of {POSITIONS}, not {self.position!r}")
        if self.lr is None and self.n_dev < 1:
            problems.append("n_dev must be >= 1 to choose the learning rate (or give a fixed lr)")
        if self.episodes is not None and not 1 <= self.episodes <= self.n_test:
            problems.append(f"episodes must be in [1, n_test={self.n_test}], not {self.episodes}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be positive, not {self.lr}")
        if any(not (math.isfinite(x) and x > 0) for x in self.lrs):
            problems.append(f"every candidate lr must be positive, got {self.lrs}")
        if problems:
            raise ValueError("Invalid compare options: " + "; ".join(problems) + ".")

    @classmethod
    def from_dict(cls, values: dict) -> CompareRunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown CompareRunConfig option(s) {unknown}; known: {sorted(known)}.")
        return cls(**values)


# ------------------------------------------------------------------------------------------------
# Episodes
# ------------------------------------------------------------------------------------------------


def synthetic_world_of(model_name: str):
    """The `SyntheticWorld` shipped next to a model (``world.json``), or None for other models."""
    from icl_kernels.models import ASSETS
    from icl_kernels.synthetic import load_world

    for folder in (Path(model_name).expanduser(), ASSETS / model_name):
        if (folder / "world.json").exists():
            return load_world(folder)
    if model_name == "synthetic-gpt-neo":
        from icl_kernels.errors import MissingAssetError

        raise MissingAssetError(
            f"The synthetic-world model is not shipped yet ({ASSETS / model_name} has no world.json)."
        )
    return None


def _split(n: int, parts: int) -> list[np.ndarray]:
    return [chunk for chunk in np.array_split(np.arange(n), parts)]


def text_episodes(task, tokenizer, n_ctx: int | None, cfg: CompareRunConfig):
    """(episodes, label ids) for a text task: balanced demonstrations from train, queries from test."""
    from icl_kernels.compare import Episode, training_sequences
    from icl_kernels.prompts import PromptBuilder, RandomSelector

    data = task.load(seed=cfg.seed)
    pool, test = data["train"], data["test"]
    if cfg.n_test > len(test):
        raise ValueError(f"n_test={cfg.n_test} but task {task.name!r} has {len(test)} test examples.")
    n_episodes = cfg.episodes or 1
    pool_labels = np.asarray(pool["label"])
    selector = RandomSelector(balanced=True)
    demo_sets = [selector.select(pool_labels, None, cfg.shots, np.random.default_rng([cfg.seed, e, 0xC0]))
                 for e in range(n_episodes)]
    used = {i for s in demo_sets for i in s}
    rest = [i for i in np.random.default_rng([cfg.seed, 0xDE5]).permutation(len(pool)).tolist() if i not in used]
    dev_indices = rest[: cfg.n_dev] if cfg.lr is None else []
    builder = PromptBuilder(task, tokenizer, n_ctx=n_ctx)
    if builder.bos_id is None:
        raise ValueError("This tokenizer has no BOS token; the comparison aligns demonstrations through it.")
    dev_prompts = [builder.build([], pool[i], query_index=i) for i in dev_indices]
    dev_gold = [int(pool[i]["label"]) for i in dev_indices]
    episodes = []
    for e, chunk in enumerate(_split(cfg.n_test, n_episodes)):
        demos = [pool[i] for i in demo_sets[e]]
        icl, zsl, gold = [], [], []
        for qi in chunk.tolist():
            query = test[qi]
            icl.append(builder.build(demos, query, demo_indices=demo_sets[e], query_index=qi))
            zsl.append(builder.build([], query, query_index=qi))
            gold.append(int(query["label"]))
        episodes.append(Episode(icl, zsl, gold, training_sequences(icl[0]), dev_prompts, dev_gold,
                                name=f"demos {demo_sets[e]}"))
    return episodes, builder.label_ids


def _synthetic_prompt(world, demos: np.ndarray, x: np.ndarray, y: int | None):
    from icl_kernels.prompts import IclPrompt

    d = world.delim_id
    tokens: list[int] = [d]
    xs, ys, seps = [], [], []
    length = world.config.x_len

    def append(ids) -> tuple[int, int]:
        start = len(tokens)
        tokens.extend(int(t) for t in ids)
        return (start, len(tokens))

    for demo in demos:
        xs.append(append(demo[:length]))
        ys.append(append(demo[length:]))
        seps.append(append([d]))
    query_span = append(x)
    return IclPrompt(
        tokens=tuple(tokens), demo_input_spans=tuple(xs), demo_label_spans=tuple(ys), separator_spans=tuple(seps),
        demo_labels=tuple(int(demo[length]) for demo in demos), query_span=query_span,
        query_label=None if y is None else int(y), bos_position=0,
    )


def synthetic_episodes(world, n_ctx: int | None, cfg: CompareRunConfig):
    """(episodes, label ids) on the synthetic world: one concept per episode (see the module docstring)."""
    from icl_kernels.compare import Episode, training_sequences

    if n_ctx is not None and world.prompt_len(cfg.shots) > n_ctx:
        raise ValueError(
            f"A {cfg.shots}-shot synthetic prompt is {world.prompt_len(cfg.shots)} tokens, longer than the "
            f"model's context {n_ctx}; use fewer shots."
        )
    n_episodes = cfg.episodes or min(world.n_concepts, cfg.n_test)
    n_dev = 0 if cfg.lr is not None else max(1, math.ceil(cfg.n_dev / n_episodes))
    length = world.config.x_len
    episodes = []
    for e, chunk in enumerate(_split(cfg.n_test, n_episodes)):
        concept = e % world.n_concepts
        rng = np.random.default_rng([cfg.seed, e, 0x5E])
        demos = world.sample_sequences(np.full(cfg.shots, concept), length + 1, rng)
        queries = world.sample_sequences(np.full(len(chunk), concept), length + 1, rng)
        dev = world.sample_sequences(np.full(n_dev, concept), length + 1, rng) if n_dev else np.zeros((0, length + 1), np.int64)
        icl = [_synthetic_prompt(world, demos, q[:length], q[length]) for q in queries]
        zsl = [_synthetic_prompt(world, demos[:0], q[:length], q[length]) for q in queries]
        dev_prompts = [_synthetic_prompt(world, demos[:0], q[:length], q[length]) for q in dev]
        episodes.append(Episode(icl, zsl, [int(q[length]) for q in queries], training_sequences(icl[0]),
                                dev_prompts, [int(q[length]) for q in dev], name=f"concept {concept}"))
    return episodes, [[v] for v in range(world.vocab_size)]


# ------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------


def compare_report(cfg: CompareRunConfig, model=None, progress: bool = True):
    """Load (or take) the model, build episodes and run the comparison; returns (result, episodes)."""
    from icl_kernels.compare import CompareConfig, compare, untrained_copy

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = synthetic_world_of(cfg.model)
    if world is not None and cfg.task not in (None, *SYNTHETIC_TASKS):
        raise ValueError(
            f"{cfg.model!r} is trained on the synthetic world, not on text: use --task synthetic (the default "
            f"for this model), not {cfg.task!r}."
        )
    task = None
    if world is None:
        if cfg.task in SYNTHETIC_TASKS:
            raise ValueError(f"--task {cfg.task} needs a model trained on the synthetic world (synthetic-gpt-neo).")
        from icl_kernels.tasks import DEFAULT_TASK, get_task

        task = get_task(cfg.task or DEFAULT_TASK)  # a bad name fails before the model loads
    if model is None:
        from icl_kernels.models import load_model

        model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, backend=cfg.backend)
    n_ctx = int(model.cfg.n_ctx)
    if world is not None:
        episodes, label_ids = synthetic_episodes(world, n_ctx, cfg)
    else:
        episodes, label_ids = text_episodes(task, model.tokenizer, n_ctx, cfg)
    untrained = untrained_copy(model, seed=cfg.seed) if cfg.untrained else None
    result = compare(
        model, episodes, label_ids,
        CompareConfig(position=cfg.position, lrs=tuple(cfg.lrs), lr=cfg.lr, seed=cfg.seed, direct=cfg.direct),
        untrained=untrained, progress=progress, log=print if progress else None,
    )
    n_dev = len(episodes[0].dev_gold) if task is not None else sum(len(ep.dev_gold) for ep in episodes)
    result.metrics.update(model=cfg.model, task=task.name if task is not None else "synthetic", shots=cfg.shots,
                          seed=cfg.seed, n_dev=n_dev, backend=tl_backend_name(model))
    return result, episodes


def tl_backend_name(model) -> str:
    from icl_kernels import backend as tl_backend

    return tl_backend.backend_of(model)


def write_compare_report(result, cfg: CompareRunConfig, out: str | Path) -> Path:
    from icl_kernels.compare import compare_figures

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "layers.csv", result.layers)
    write_csv(out / "heads.csv", result.heads)
    write_csv(out / "examples.csv", result.examples)
    if result.lr_table:
        write_csv(out / "lr_search.csv", result.lr_table)
    write_json(out / "config.json", asdict(cfg))
    title = f"({cfg.model}, {result.metrics.get('task')}, {cfg.shots} shots)"
    for name, fig in compare_figures(result, title).items():
        fig.write_html(str(out / f"{name}.html"), include_plotlyjs="cdn")
    write_json(out / "metrics.json", _finite({**result.metrics, "timing": result.timing}))
    return out


def _finite(value):
    """NaN / inf become None (null) so that metrics.json is standard JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_line(metrics: dict) -> str:
    return (
        f"{metrics['model']} on {metrics['task']} ({metrics['shots']} shots, n={metrics['n_test']}, "
        f"lr {metrics['lr']:g}, position {metrics['position']}): accuracy ZSL {metrics['zsl_accuracy']:.3f} "
        f"FT {metrics['ft_accuracy']:.3f} ICL {metrics['icl_accuracy']:.3f}; Rec2FTP {metrics['rec2ftp']:.3f} "
        f"(chance-corrected {metrics['rec2ftp_chance']:.3f}); SimAOU {metrics['simaou']:.3f} "
        f"(random {metrics['simaou_random']:.3f}, untrained {metrics['simaou_untrained']:.3f}); SimAM "
        f"{metrics['simam_before']:.3f} -> {metrics['simam_after']:.3f}; Kendall {metrics['kendall']:.3f} "
        f"(random {metrics['kendall_random']:.3f})"
    )


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``compare`` on an ``argparse`` subparsers object."""
    from icl_kernels.cli import add_model_arguments, add_task_arguments

    p = subparsers.add_parser(
        "compare", help="ICL vs finetuning of key/value projections (Dai et al.) with controls",
        description="\n\n".join(__doc__.split("\n\n")[1:3]) if __doc__ else None,
    )
    add_model_arguments(p)
    add_task_arguments(p)
    p.set_defaults(task=None)  # resolved per model: the default text task, or the synthetic world
    p.add_argument("--position", choices=("prediction", "first-label"), default="prediction",
                   help="recording position: last prompt token, or the first label token appended")
    p.add_argument("--n-dev", type=int, default=32, help="development queries for the learning-rate search")
    p.add_argument("--episodes", type=int, default=None,
                   help="demonstration sets (default: 1 for text tasks, one per concept for the synthetic world)")
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1", help="candidate learning rates")
    p.add_argument("--lr", type=float, default=None, help="fixed learning rate (skips the search)")
    p.add_argument("--no-untrained", action="store_true", help="skip the untrained-model control")
    p.add_argument("--no-direct", action="store_true", help="skip the dW_ICL vs finetuning-update comparison")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run_compare)
    return p


def run_compare(args) -> int:
    from icl_kernels.cli import parse_numbers

    cfg = CompareRunConfig(
        model=args.model, task=args.task, shots=args.shots, n_test=args.n_test, seed=args.seed,
        backend=args.backend, device=args.device, dtype=args.dtype, position=args.position, n_dev=args.n_dev,
        episodes=args.episodes, lrs=parse_numbers(args.lrs, float, "--lrs"), lr=args.lr, untrained=not args.no_untrained,
        direct=not args.no_direct, threads=args.threads,
    )
    start = time.perf_counter()
    result, _ = compare_report(cfg)
    result.timing["total_s"] = time.perf_counter() - start
    write_compare_report(result, cfg, args.out)
    print(summary_line(result.metrics) + f" ({args.out}/metrics.json)")
    return 0
