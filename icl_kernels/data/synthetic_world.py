"""A synthetic in-context-learning world: a mixture of hidden Markov models that samples documents and k-shot prompts.

The world follows the pretraining model of Xie et al. (2022) that Han et al. use for their Theorem 1:

* ``n_concepts`` latent concepts (tasks). Concept ``c`` is an HMM over ``n_states`` hidden states that
  share one emission matrix ``emit[s, v]`` over a vocabulary of ``vocab_size`` tokens; the concept owns
  its transition matrix ``trans[c, s, s']`` and its start distribution ``start[c, s]``.
* A document is drawn from one concept (uniform prior): it begins with the delimiter token (id
  ``vocab_size``), then sequences separated by delimiters. Every sequence is a fresh run of the
  concept's HMM from its start distribution; its length is uniform on ``[seg_len_min, seg_len_max]``
  and independent of the tokens, so the length never carries information about the concept.
* An ICL prompt with k shots is ``<d> x_1 y_1 <d> x_2 y_2 <d> ... <d> x_k y_k <d> x`` where every
  demonstration is a fresh sequence of the same concept, ``x_i`` its first ``x_len`` emissions and
  ``y_i`` the next emission; the label of the test ``x`` is its next emission. The labels are ordinary
  HMM tokens, so every vocabulary token (never the delimiter) can be a label.

Construction of the default world (``make_world``), chosen so that the concept matters: the hidden
states alias heavily onto few tokens (``n_states / vocab_size`` states per token), every state has
``branching`` likely successors per concept plus a little uniform mass, and start distributions are
concept specific. A short ``x`` then says little about the concept (low zero-shot accuracy), while the
next token given the concept and ``x`` is fairly predictable; each demonstration adds evidence about
the concept and the Bayes accuracy climbs with k.

The exact Bayes predictor of this world, and accuracy vs shots of a model next to it, are in
:mod:`icl_kernels.data.synthetic_bayes`.

Everything is numpy float64 and seeded; the same config and seed rebuild the same world bit for bit
(``world.json`` stores the config plus a SHA-256 of the arrays and ``load_world`` checks it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icl_kernels.utils.errors import MissingAssetError, WorldFileError

__all__ = [
    "synthetic_world",
    "WorldConfig",
    "SyntheticWorld",
    "SyntheticPromptBatch",
    "make_world",
    "load_world",
    "SYNTHETIC_MODEL_DIR",
]

#: Folder of the shipped GPT-Neo trained on the default world (config.json, model.safetensors, world.json).
SYNTHETIC_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "synthetic-gpt-neo"


# ----------------------------------------------------------------------------------------------------
# World definition
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the mixture-of-HMMs world (see the module docstring).

    n_concepts: number of latent concepts (tasks), uniform prior.
    n_states: hidden states shared by all concepts.
    vocab_size: emitted tokens; the delimiter gets id ``vocab_size``.
    x_len: emissions in a prompt's x (the label is the next one).
    structure: "layered" (default; see ``make_world``) or "random" (generic sparse HMMs).
    branching: likely successors of every state under each concept.
    trans_smoothing: probability mass of every transition row spread uniformly over all states.
    emit_smoothing: probability mass of every emission row spread uniformly over the vocabulary.
    start_support: number of likely start states of each concept (``None``: all states).
    start_smoothing: probability mass of the start distribution spread uniformly over all states.
    seg_len_min, seg_len_max: length range (inclusive, uniform) of the sequences in documents.
    doc_len: tokens per training document (the delimiter that opens it included).
    seed: seed of the world's parameters (not of the data drawn from it).
    """

    n_concepts: int = 8
    n_states: int = 32
    vocab_size: int = 8
    x_len: int = 3
    structure: str = "layered"
    branching: int = 2
    trans_smoothing: float = 0.02
    emit_smoothing: float = 0.05
    start_support: int | None = None
    start_smoothing: float = 0.02
    seg_len_min: int = 2
    seg_len_max: int = 8
    doc_len: int = 192
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_concepts", "n_states", "vocab_size", "x_len", "branching", "seg_len_min", "doc_len"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.structure not in ("layered", "random"):
            problems.append(f"structure={self.structure!r} must be 'layered' or 'random'")
        elif self.structure == "layered":
            if self.n_states % (self.x_len + 1):
                problems.append(f"layered worlds need n_states={self.n_states} divisible by x_len+1={self.x_len + 1}")
            elif self.n_states // (self.x_len + 1) < max(self.branching, self.start_support or 1):
                problems.append("layered worlds need n_states/(x_len+1) >= branching and >= start_support")
            if self.x_len < 1:
                problems.append("layered worlds need x_len >= 1")
        if self.vocab_size < 2:
            problems.append(f"vocab_size={self.vocab_size} must be >= 2")
        if self.branching > self.n_states:
            problems.append(f"branching={self.branching} exceeds n_states={self.n_states}")
        if self.start_support is not None and not 1 <= self.start_support <= self.n_states:
            problems.append(f"start_support={self.start_support} must be in [1, n_states={self.n_states}] or None")
        if self.seg_len_max < self.seg_len_min:
            problems.append(f"seg_len_max={self.seg_len_max} < seg_len_min={self.seg_len_min}")
        for name in ("trans_smoothing", "emit_smoothing", "start_smoothing"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                problems.append(f"{name}={v} must be in [0, 1]")
        if problems:
            raise ValueError("Invalid WorldConfig: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorldConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown WorldConfig keys {sorted(unknown)}; known keys are {sorted(known)}.")
        return cls(**d)


@dataclass
class SyntheticPromptBatch:
    """k-shot prompts of one length. ``tokens[:, -1]`` is the last token of the test x.

    tokens: int64 [batch, pos] = ``<d> x_1 y_1 <d> ... <d> x_k y_k <d> x``.
    labels: int64 [batch], the next emission after x (the gold label).
    concepts: int64 [batch], the concept that generated the prompt.
    label_positions: positions of y_1..y_k in ``tokens`` (same for every row).
    x_positions: [k+1, x_len] positions of x_1..x_k and of the test x.
    """

    tokens: np.ndarray
    labels: np.ndarray
    concepts: np.ndarray
    k: int
    label_positions: np.ndarray
    x_positions: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs`` [n, m] (rows sum to 1) by inverse CDF; one uniform per row."""
    cum = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[0]) * cum[:, -1]
    idx = (cum < u[:, None]).sum(axis=-1)
    return np.minimum(idx, probs.shape[-1] - 1)


@dataclass
class SyntheticWorld:
    """The mixture of HMMs: ``start`` [C, S], ``trans`` [C, S, S], ``emit`` [S, V] (rows sum to 1)."""

    config: WorldConfig
    start: np.ndarray
    trans: np.ndarray
    emit: np.ndarray
    concept_prior: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        cfg = self.config
        C, S, V = cfg.n_concepts, cfg.n_states, cfg.vocab_size
        self.start = np.asarray(self.start, dtype=np.float64)
        self.trans = np.asarray(self.trans, dtype=np.float64)
        self.emit = np.asarray(self.emit, dtype=np.float64)
        if self.concept_prior is None:
            self.concept_prior = np.full(C, 1.0 / C)
        self.concept_prior = np.asarray(self.concept_prior, dtype=np.float64)
        shapes = {"start": (C, S), "trans": (C, S, S), "emit": (S, V), "concept_prior": (C,)}
        for name, shape in shapes.items():
            arr = getattr(self, name)
            if arr.shape != shape:
                raise ValueError(f"SyntheticWorld.{name} has shape {arr.shape}, expected {shape} from the config.")
            if (arr < 0).any() or not np.allclose(arr.sum(-1), 1.0, atol=1e-9):
                raise ValueError(f"SyntheticWorld.{name} must be non-negative with rows summing to 1.")

    # -- basic properties ------------------------------------------------------------------------
    @property
    def n_concepts(self) -> int:
        return self.config.n_concepts

    @property
    def n_states(self) -> int:
        return self.config.n_states

    @property
    def vocab_size(self) -> int:
        """Number of HMM tokens (possible labels); the delimiter is extra."""
        return self.config.vocab_size

    @property
    def delim_id(self) -> int:
        return self.config.vocab_size

    @property
    def n_tokens(self) -> int:
        """Model vocabulary: HMM tokens plus the delimiter."""
        return self.config.vocab_size + 1

    @property
    def label_ids(self) -> np.ndarray:
        """Token ids that can be labels (every HMM token, never the delimiter)."""
        return np.arange(self.config.vocab_size)

    def prompt_len(self, k: int) -> int:
        return 1 + k * (self.config.x_len + 2) + self.config.x_len

    def checksum(self) -> str:
        h = hashlib.sha256()
        for arr in (self.start, self.trans, self.emit, self.concept_prior):
            h.update(np.ascontiguousarray(arr, dtype="<f8").tobytes())
        return h.hexdigest()

    # -- serialisation ---------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        return {
            "kind": "icl_kernels.data.synthetic_world mixture of HMMs",
            "config": self.config.to_dict(),
            "delim_id": self.delim_id,
            "n_tokens": self.n_tokens,
            "label_ids": self.label_ids.tolist(),
            "sha256_float64_arrays": self.checksum(),
            "rebuild": "icl_kernels.data.synthetic_world.load_world(path) == make_world(WorldConfig(**config))",
        }

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> "SyntheticWorld":
        return load_world(path)

    # -- sampling --------------------------------------------------------------------------------
    def sample_sequences(self, concepts: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
        """Fresh HMM runs from the start distributions: int64 [len(concepts), length] (no delimiters)."""
        concepts = np.asarray(concepts, dtype=np.int64)
        n = concepts.shape[0]
        out = np.empty((n, length), dtype=np.int64)
        state = _categorical(rng, self.start[concepts]) if n else np.zeros(0, np.int64)
        for t in range(length):
            if t > 0:
                state = _categorical(rng, self.trans[concepts, state])
            out[:, t] = _categorical(rng, self.emit[state])
        return out

    def sample_documents(
        self, n_docs: int, rng: np.random.Generator, doc_len: int | None = None, concepts: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Training documents: (tokens int64 [n_docs, doc_len], concepts int64 [n_docs]).

        Every document starts with the delimiter; sequences of length uniform in
        [seg_len_min, seg_len_max] follow, each closed by a delimiter; the last one is cut at doc_len.
        """
        cfg = self.config
        T = cfg.doc_len if doc_len is None else int(doc_len)
        if concepts is None:
            concepts = rng.choice(cfg.n_concepts, size=n_docs, p=self.concept_prior)
        concepts = np.asarray(concepts, dtype=np.int64)
        out = np.empty((n_docs, T), dtype=np.int64)
        out[:, 0] = self.delim_id
        remaining = rng.integers(cfg.seg_len_min, cfg.seg_len_max + 1, size=n_docs)
        fresh = np.ones(n_docs, dtype=bool)
        state = np.zeros(n_docs, dtype=np.int64)
        for t in range(1, T):
            # every draw is made for every row (then selected), so the stream does not depend on branches
            new_len = rng.integers(cfg.seg_len_min, cfg.seg_len_max + 1, size=n_docs)
            s_start = _categorical(rng, self.start[concepts])
            s_next = _categorical(rng, self.trans[concepts, state])
            closing = remaining == 0
            state = np.where(closing, state, np.where(fresh, s_start, s_next))
            tok = _categorical(rng, self.emit[state])
            out[:, t] = np.where(closing, self.delim_id, tok)
            # bookkeeping
            emitted = ~closing
            remaining = np.where(closing, new_len, remaining - 1)
            fresh = np.where(closing, True, np.where(emitted, False, fresh))
        return out, concepts

    def sample_prompts(
        self, n: int, k: int, rng: np.random.Generator, concepts: np.ndarray | None = None
    ) -> SyntheticPromptBatch:
        """``n`` k-shot prompts (see the module docstring for the layout)."""
        if k < 0 or n < 1:
            raise ValueError(f"sample_prompts needs n >= 1 and k >= 0, got n={n}, k={k}.")
        cfg = self.config
        L = cfg.x_len
        if concepts is None:
            concepts = rng.choice(cfg.n_concepts, size=n, p=self.concept_prior)
        concepts = np.asarray(concepts, dtype=np.int64)
        seqs = self.sample_sequences(np.repeat(concepts, k + 1), L + 1, rng).reshape(n, k + 1, L + 1)
        demos = np.concatenate([seqs[:, :k], np.full((n, k, 1), self.delim_id, np.int64)], axis=-1)
        tokens = np.concatenate(
            [np.full((n, 1), self.delim_id, np.int64), demos.reshape(n, k * (L + 2)), seqs[:, k, :L]], axis=1
        )
        starts = 1 + np.arange(k + 1) * (L + 2)
        x_positions = starts[:, None] + np.arange(L)[None, :]
        label_positions = starts[:k] + L
        assert tokens.shape[1] == self.prompt_len(k)
        return SyntheticPromptBatch(
            tokens=tokens,
            labels=seqs[:, k, L].copy(),
            concepts=concepts,
            k=k,
            label_positions=label_positions,
            x_positions=x_positions,
        )


def make_world(config: WorldConfig | None = None, **overrides: Any) -> SyntheticWorld:
    """Build the world's parameters from ``config`` (plus overrides), deterministically from its seed.

    ``structure="layered"`` (default): the states form ``x_len + 1`` layers of ``n_states / (x_len+1)``
    states; a sequence walks layer 0 -> 1 -> ... -> x_len -> 0 -> ... (a longer document sequence wraps
    around). Layer-0 start weights are concept specific; the x-layer transitions (layer l -> l+1 for
    l < x_len - 1) and the wrap-around (x_len -> 0) are shared by all concepts; the transition from the
    last x layer into the label layer is the concept's own (one likely successor per state). So an x
    of length ``x_len`` says little about the concept, while its next token depends on it.

    ``structure="random"``: every concept has random sparse transitions over all states (``branching``
    likely successors per state) and its own start weights on ``start_support`` states.

    All rows get the smoothing masses, so every token sequence has positive probability. Only
    ``permutation``/``random`` draws of numpy's PCG64 generator are used (stable across versions).
    """
    cfg = config or WorldConfig()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    rng = np.random.default_rng(cfg.seed)
    C, S, V, b, L = cfg.n_concepts, cfg.n_states, cfg.vocab_size, cfg.branching, cfg.x_len

    def sparse_row(candidates: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        succ = candidates[rng.permutation(candidates.shape[0])[:n]]
        w = 0.5 + rng.random(succ.shape[0])
        return succ, w / w.sum()

    trans = np.full((C, S, S), cfg.trans_smoothing / S)
    start = np.full((C, S), cfg.start_smoothing / S)
    if cfg.structure == "layered":
        m = S // (L + 1)
        layers = [np.arange(i * m, (i + 1) * m) for i in range(L + 1)]
        main_token = np.concatenate([rng.permutation(np.arange(m) % V) for _ in range(L + 1)])
        shared = np.zeros((S, S))
        for i in range(L + 1):
            if i == L - 1:
                continue  # the concept-specific step, below
            for s in layers[i]:
                succ, w = sparse_row(layers[(i + 1) % (L + 1)], b)
                shared[s, succ] = w
        for c in range(C):
            block = shared.copy()
            for s in layers[L - 1]:
                succ, w = sparse_row(layers[L], 1)
                block[s, succ] = w
            trans[c] += (1.0 - cfg.trans_smoothing) * block
            succ, w = sparse_row(layers[0], cfg.start_support or m)
            start[c, succ] += (1.0 - cfg.start_smoothing) * w
    else:  # "random"
        main_token = rng.permutation(np.arange(S) % V)
        for c in range(C):
            for s in range(S):
                succ, w = sparse_row(np.arange(S), b)
                trans[c, s, succ] += (1.0 - cfg.trans_smoothing) * w
            succ, w = sparse_row(np.arange(S), cfg.start_support or S)
            start[c, succ] += (1.0 - cfg.start_smoothing) * w
    emit = np.full((S, V), cfg.emit_smoothing / V)
    emit[np.arange(S), main_token] += 1.0 - cfg.emit_smoothing
    # exact renormalisation against rounding
    trans /= trans.sum(-1, keepdims=True)
    start /= start.sum(-1, keepdims=True)
    emit /= emit.sum(-1, keepdims=True)
    return SyntheticWorld(config=cfg, start=start, trans=trans, emit=emit)


def load_world(path: str | Path) -> SyntheticWorld:
    """Rebuild the world from a ``world.json`` (or a folder holding one) and check its SHA-256."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "world.json"
    if not path.is_file():
        raise MissingAssetError(f"No world.json at {path}; pass a world.json file or the folder holding it.")
    written_by = "pass a world.json written by SyntheticWorld.to_json (e.g. the one next to synthetic-gpt-neo)"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WorldFileError(f"The world file {path} is not JSON ({error}); {written_by}.") from None
    if not isinstance(d, dict) or not isinstance(d.get("config"), dict):
        raise WorldFileError(f"The world file {path} has no 'config' object; it was not written by "
                             f"SyntheticWorld.to_json; {written_by}.")
    try:
        world = make_world(WorldConfig.from_dict(d["config"]))
    except (TypeError, ValueError) as error:
        raise WorldFileError(f"The world file {path} has an invalid 'config' ({error}); {written_by}.") from None
    want = d.get("sha256_float64_arrays")
    if want is not None and world.checksum() != want:
        raise WorldFileError(
            f"Rebuilding the world from {path} gave different parameters (sha256 {world.checksum()[:12]} != "
            f"{want[:12]}); the numpy random streams changed. Use the numpy version recorded with the model."
        )
    return world


def synthetic_world(name_or_path: str | None, *, required: bool = False):
    """The `SyntheticWorld` a model was trained on (``world.json`` in its folder), or None.

    ``name_or_path`` is a registered name (looked up in the shipped assets) or a model folder, read
    as `icl_kernels.models.loading.model_folder` reads it: a folder of the current directory named like
    a registered model is not that model's folder unless written as a path (``./synthetic-gpt-neo``).

    Raises:
        MissingAssetError: ``required`` and the model has no world.
    """
    from icl_kernels.models.loading import model_folder  # noqa: PLC0415 - transformers only where a model is named

    name = str(name_or_path or "")
    folder = model_folder(name) if name else None
    for candidate in ([folder] if folder is not None else [SYNTHETIC_MODEL_DIR.parent / name]):
        if name and (candidate / "world.json").is_file():
            return load_world(candidate)
    if required:
        raise MissingAssetError(
            f"This analysis needs the synthetic world the model was trained on, but there is no world.json next to "
            f"model {name!r}; use a model trained on the synthetic world (e.g. synthetic-gpt-neo) or a text task."
        )
    return None
