"""``theorem``: Theorem 1 of Han et al. simulated on the synthetic mixture-of-HMMs world.

`icl_kernels.kernel.theorem_one.simulate` compares, for growing numbers of demonstrations, the exact Bayes
predictive, the concept-knowing oracle, the theorem's kernel regression (``features``: ``forward``,
``operator``) and the demonstrations' label frequencies (table ``theorem``). With ``model`` (a model
trained on the synthetic world, e.g. ``synthetic-gpt-neo``), `icl_kernels.kernel.theorem_one.model_behaviour`
asks the same of the model and of its best label-attention head (table ``model``; shot counts whose
prompts exceed the model's context are left out). The world is ``world`` (a ``world.json``), else
the one next to the model, else the default world; a world file that is not a ``world.json`` is
refused with one line naming it. Figure ``theorem``: accuracy and agreement with
Bayes against the number of demonstrations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from icl_kernels.data.synthetic_world import load_world, make_world, synthetic_world
from icl_kernels.kernel.theorem_one import (
    FEATURES,
    model_behaviour,
    simulate,
    theorem_figure,
)
from icl_kernels.models.options import ModelOptions
from icl_kernels.studies.catalog import builtin_help
from icl_kernels.studies.registry import register
from icl_kernels.studies.report import Report
from icl_kernels.studies.tidy import register_quantities
from icl_kernels.utils.config import Options
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.stats import Estimate, proportion

__all__ = ["TheoremConfig", "TheoremReport", "run"]


@dataclass
class TheoremConfig(Options):
    """Options of the Theorem 1 simulation (and of the optional trained model's behaviour)."""

    shots: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32, 64, 128, 256), metadata={
        "help": "demonstration counts (>= 1) of the simulation"})
    n: int = field(default=1000, metadata={"help": "prompts per demonstration count"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    features: tuple[str, ...] = field(default=("forward", "operator"), metadata={
        "help": "theorem kernel features: forward, operator"})
    world: str | None = field(default=None, metadata={
        "help": "world.json (default: the model's, else the default world)"})
    model: str | None = field(default=None, metadata={
        "help": "a model trained on the synthetic world (e.g. synthetic-gpt-neo); default: simulation only"})
    backend: str | None = field(default=None, metadata={
        "choices": ("hooked", "bridge"), "help": "TransformerLens backend (default: HookedTransformer where installed)"})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda if available)"})
    model_shots: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32), metadata={
        "help": "demonstration counts of the model's prompts"})
    model_n: int = field(default=300, metadata={"help": "model prompts per demonstration count"})

    def __post_init__(self) -> None:
        self.shots, self.model_shots, self.features = tuple(self.shots), tuple(self.model_shots), tuple(self.features)
        problems = []
        if not self.shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.shots):
            problems.append(f"shots must be demonstration counts >= 1 (with no demonstrations every kernel "
                            f"abstains: it averages over the demonstrations), not {self.shots!r}")
        if not self.model_shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in self.model_shots):
            problems.append(f"model_shots must be demonstration counts >= 0, not {self.model_shots!r}")
        bad = [f for f in self.features if f not in FEATURES]
        if bad:
            problems.append(f"features must be among {FEATURES}, not {bad}")
        for name in ("n", "model_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an integer >= 1, not {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be an integer >= 0, not {self.seed!r}")
        if problems:
            raise InvalidOptionError("Invalid theorem options: " + "; ".join(problems) + ".")
        if self.model is not None:  # backend and device checked as for every model
            ModelOptions(model=self.model, backend=self.backend, device=self.device)


@dataclass
class TheoremReport(Report):
    """Tables ``theorem`` (simulation) and ``model`` (trained model, when given); figure ``theorem``."""

    def figures(self) -> dict[str, Any]:
        return {"theorem": theorem_figure(self.tables["theorem"], self.tables.get("model"))}

    def line(self) -> str:
        sim = self.tables["theorem"]
        top = max(self.config.shots)
        accuracy = ", ".join(
            f"{name} {self.summary[name][top]['accuracy']:.3f}" for name in sim["predictor"].unique()
        )
        abstain = ", ".join(
            f"{name} {self.summary['abstain'][name][top]:.3f}" for name in sim["predictor"].unique()
            if name.startswith("kr_") and name in self.summary.get("abstain", {})
        )
        return f"Theorem 1 simulation, {top} shots: accuracy {accuracy}" + (f"; abstain {abstain}" if abstain else "")


def _world(cfg: TheoremConfig):
    if cfg.world:
        return load_world(cfg.world)
    if cfg.model:
        return synthetic_world(cfg.model, required=True)
    return make_world()


def run(cfg: TheoremConfig, model=None, progress: bool = True) -> TheoremReport:
    """The simulation, and the behaviour of ``model`` (or ``cfg.model``, loaded) when there is one."""
    world = _world(cfg)
    sim = simulate(world, shots=cfg.shots, n=cfg.n, seed=cfg.seed, features=cfg.features, progress=progress)
    behaviour = None
    if cfg.model or model is not None:
        if model is None:
            model = ModelOptions(model=cfg.model, device=cfg.device, backend=cfg.backend).load()
        shots = [k for k in cfg.model_shots if world.prompt_len(k) <= model.cfg.n_ctx]
        behaviour = model_behaviour(model, world, shots=shots, n=cfg.model_n, seed=cfg.seed, progress=progress)
    summary: dict[str, Any] = {"world": world.config.to_dict(), "n": cfg.n, "seed": cfg.seed}
    for name, g in sim.groupby("predictor", sort=False):
        g = g.sort_values("shots")
        summary[name] = {int(k): {"accuracy": float(a), "agree_bayes": float(b)}
                         for k, a, b in zip(g["shots"], g["accuracy"], g["agree_bayes"])}
    # added (issue 13): abstentions (no estimate or a tie; counted as wrong) and 95% intervals per n
    summary["unit"] = "prompts"
    summary["intervals"] = {
        name: {int(r.shots): {
            "accuracy": proportion(round(r.accuracy * r.n), int(r.n)),
            "agree_bayes": proportion(round(r.agree_bayes * r.n), int(r.n)),
            "abstain": proportion(round(r.abstain * r.n), int(r.n)),
            "accuracy_when_answering": proportion(
                round(r.accuracy * r.n), int(r.n) - round(r.abstain * r.n)),
        } for r in g.sort_values("shots").itertuples()}
        for name, g in sim.groupby("predictor", sort=False)
    }
    summary["abstain"] = {name: {int(k): float(a) for k, a in zip(g["shots"], g["abstain"])}
                          for name, g in sim.groupby("predictor", sort=False)}
    ranks = sim.dropna(subset=["kernel_rank"]).groupby("predictor")["kernel_rank"].first()
    summary["kernel_rank"] = {k: int(v) for k, v in ranks.items()}
    tables = {"theorem": sim}
    if behaviour is not None:
        summary["model"] = cfg.model or str(getattr(model.cfg, "model_name", "") or "")
        summary["model_behaviour"] = {
            int(k): {m: float(v) for m, v in zip(g["metric"], g["value"])} for k, g in behaviour.groupby("shots")
        }
        # 95% intervals of the model's rates (all prompts) and the head's (held-out prompts), and the
        # paired bootstrap of head agreement minus the model's majority share
        summary["model_behaviour_intervals"] = {
            int(k): {r.metric: Estimate(value=r.value, low=r.low, high=r.high, n=int(r.n), unit=r.unit)
                     for r in g.itertuples() if not np.isnan(r.low)}
            for k, g in behaviour.groupby("shots")
        }
        tables["model"] = behaviour
    return TheoremReport("theorem", cfg, tables, summary)


#: What each quantity of ``summary.csv`` is (`icl_kernels.studies.tidy.register_quantities`; docs/columns.md).
register_quantities('theorem', (
    ('(bayes|oracle|kr_\\w+|label_\\w+)\\.\\d+\\.accuracy', "accuracy of a predictor with <k> demonstrations: exact Bayes predictive, concept-knowing oracle, the theorem's kernel regression (forward / operator features), label frequencies (Wilson interval)"),
    ('(bayes|oracle|kr_\\w+|label_\\w+)\\.\\d+\\.agree_bayes', 'how often that predictor agrees with the Bayes predictive'),
    ('intervals\\.[^.]+\\.\\d+\\.(abstain|accuracy_when_answering)', 'share of prompts with no prediction (a tie), and accuracy on the others'),
    ('abstain\\.[^.]+\\.\\d+', 'share of prompts where the predictor abstains (a tie)'),
    ('kernel_rank\\.\\w+', "rank of the kernel's feature matrix"),
    ('model_behaviour\\.\\d+\\.\\w+', 'the model trained on the world and its best label-attention head at <k> demonstrations: accuracy, agreement with Bayes / the model, majority share, best layer/head, kernel correlation'),
    ('world\\.\\w+|n|seed', "the synthetic world's parameters, prompts per shot count, seed"),
))

register(
    "theorem", TheoremConfig, run,
    help=builtin_help("theorem"),
    description=__doc__.split("\n\n")[1],
)
