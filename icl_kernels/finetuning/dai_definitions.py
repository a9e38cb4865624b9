"""Dai et al.'s per-query similarity scores, under the official definitions and this package's earlier variant.

Each score compares one query's three runs read at the recording position (see
`icl_kernels.finetuning.dai_metrics`): ZSL (original model, zero-shot prompt), ICL (original model,
k-shot prompt) and FT (finetuned model, zero-shot prompt). Two *definitions* are implemented:

``"official"`` (the default): what the official code computes (microsoft/LMOps, ``understand_icl``):

* SimAOU: every attention output ``h`` (per layer, after the output projection, before the residual
  add) is L2-normalised first, then ``cos(h_ICL/|h_ICL| - h_ZSL/|h_ZSL|, h_FT/|h_FT| - h_ZSL/|h_ZSL|)``
  (``icl_ft/compute_sim.py``: ``norm_hidden`` lines 63-67, applied in ``analyze_sim`` lines 126-129
  before the differences of lines 131-132 and the cosine of line 136; called with ``normalize=True`` on
  line 226);
* SimAM: the cosine of the *pre-softmax* scores ``q.k / sqrt(d_head)`` of the recording position,
  over the keys from the query's first token up to and including the recording position itself
  (demonstrations and BOS excluded, the recording token's own score included). The map is recorded as
  ``bmm(q, k^T)`` with ``q`` already scaled, before the mask and the softmax
  (``fairseq/fairseq/modules/multihead_attention.py``, ``MultiheadAttention.forward``: ``q *=
  self.scaling`` then ``record_attn_map = attn_weights`` right after the ``bmm``), sliced to the last
  row and the keys after the context, ``attn_map[:, :, -1, c_len:]``
  (``struprompting/criterions/fs_eval.py``, ``process_attention_map_classification``), and compared
  without softmax (``icl_ft/compute_sim.py``: ``analyze_attn_map`` line 154, the softmax branch of
  lines 194-197 skipped since line 230 passes ``softmax=False``; before = cos(ICL, ZSL) line 201,
  after = cos(ICL, FT) line 210). Keys masked in either run (outside a local attention window, which
  the original models did not have) are left out of both vectors.

``"softmax-weights"`` (the variant this package reported before issue 23): SimAOU on the raw
attention outputs, ``cos(h_ICL - h_ZSL, h_FT - h_ZSL)``; SimAM on the softmax attention weights
(normalised over all keys) restricted to the query's own tokens, ``query_span`` (which holds the
recording token at the ``"prediction"`` position but not the appended label token at
``"first-label"``). The two definitions are different metrics and are always reported by name.

Kendall tau has one definition (`kendall`): the ICL side is the sum over heads of the recording
position's pre-softmax scores to each visible demonstration token, the FT side ``sum_heads Q'^T q``
(``Q'`` the training tokens' queries recorded during finetuning, ``q`` the finetuned model's query),
as in ``icl_ft/compute_training_example_attn.py`` (``compute_training_attn``; its softmax is
monotone and leaves the ranks unchanged).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from icl_kernels.data.prompts import IclPrompt
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.stats import cosine, kendall_tau

__all__ = [
    "DEFINITIONS",
    "DEFINITION_TAGS",
    "check_definition",
    "simaou_update",
    "simaou",
    "simam_span",
    "simam",
    "kendall",
]

#: The definitions of SimAOU and SimAM (see the module docstring); the first is the default.
DEFINITIONS = ("official", "softmax-weights")
#: Suffix of each definition in metric names and table columns (``simaou_official`` ...).
DEFINITION_TAGS = {"official": "official", "softmax-weights": "softmax_weights"}


def check_definition(definition: str) -> str:
    if definition not in DEFINITIONS:
        raise InvalidOptionError(f"definition must be one of {DEFINITIONS}, not {definition!r}.")
    return definition


def simaou_update(
    h: Float[Tensor, "layer d_model"], h_zsl: Float[Tensor, "layer d_model"], definition: str
) -> Float[Tensor, "layer d_model"]:
    """The update of an attention output over the zero-shot one that SimAOU compares.

    ``official``: ``h/|h| - h_zsl/|h_zsl|`` in float64; ``softmax-weights``: ``h - h_zsl`` in the
    outputs' own dtype (as this package always computed it).
    """
    check_definition(definition)
    if definition == "official":
        h, h_zsl = h.double(), h_zsl.double()
        return h / h.norm(dim=-1, keepdim=True) - h_zsl / h_zsl.norm(dim=-1, keepdim=True)
    return h - h_zsl


def simaou(
    h_icl: Float[Tensor, "layer d_model"], h_zsl: Float[Tensor, "layer d_model"],
    h_ft: Float[Tensor, "layer d_model"], definition: str = "official",
) -> Float[Tensor, " layer"]:
    """SimAOU per layer: cosine of the ICL and FT updates of the attention output (`simaou_update`).
    NaN where an update is zero (e.g. FT == ZSL at learning rate 0)."""
    return cosine(simaou_update(h_icl, h_zsl, definition), simaou_update(h_ft, h_zsl, definition))


def simam_span(prompt: IclPrompt, recording_position: int, definition: str) -> tuple[int, int]:
    """Key positions ``[start, end)`` of a recorded prompt that SimAM compares.

    ``official``: from the query's first token to the recording position, inclusive;
    ``softmax-weights``: the query's own tokens (``prompt.query_span``).
    """
    check_definition(definition)
    start, end = prompt.query_span
    if not start <= recording_position:
        raise ValueError(f"The recording position {recording_position} lies before the query ({start}).")
    if definition == "official":
        return (start, recording_position + 1)
    return (start, end)


def simam(
    scores_a: Float[Tensor, "layer head_index key_pos"], span_a: tuple[int, int],
    scores_b: Float[Tensor, "layer head_index key_pos_b"], span_b: tuple[int, int],
    definition: str = "official",
) -> Float[Tensor, "layer head_index"]:
    """SimAM per layer and head between two runs of the same query (spans from `simam_span`).

    ``scores_*`` are the recording position's pre-softmax scores over all keys (``-inf`` where
    masked). ``official``: cosine of the scores on the span, keys masked in either run left out;
    ``softmax-weights``: cosine of the softmax weights (over all keys) on the span.
    """
    check_definition(definition)
    if span_a[1] - span_a[0] != span_b[1] - span_b[0]:
        raise ValueError(f"SimAM compares spans of equal length, not {span_a} and {span_b}.")
    if definition == "official":
        a, b = scores_a[..., slice(*span_a)].double(), scores_b[..., slice(*span_b)].double()
        visible = torch.isfinite(a) & torch.isfinite(b)
        zero = torch.zeros((), dtype=torch.float64)
        return cosine(torch.where(visible, a, zero), torch.where(visible, b, zero))
    return cosine(scores_a.softmax(-1)[..., slice(*span_a)], scores_b.softmax(-1)[..., slice(*span_b)])


def kendall(
    icl_demo_scores: Float[Tensor, "head_index n_tokens"],
    train_queries: Float[Tensor, "n_tokens head_index d_head"],
    query: Float[Tensor, "head_index d_head"],
) -> tuple[float, Float[Tensor, " n_visible"]]:
    """Kendall tau-b of one layer, and the ICL side it ranked.

    ``icl_demo_scores``: the recording position's pre-softmax scores to each demonstration token of
    the ICL prompt (``-inf`` where masked; masked tokens are left out of both sides);
    ``train_queries``: the query of each training token (the same tokens, in order) recorded during
    finetuning; ``query``: the finetuned model's query at the recording position (both in the
    position-free frame). ICL side ``sum_heads scores``, FT side ``sum_heads Q'^T q``.
    """
    if icl_demo_scores.shape[1] != train_queries.shape[0]:
        raise ValueError(
            f"{icl_demo_scores.shape[1]} demonstration tokens but {train_queries.shape[0]} training queries."
        )
    visible = torch.isfinite(icl_demo_scores[0])
    icl_side = icl_demo_scores[:, visible].sum(0)
    ft_side = torch.einsum("thd,hd->t", train_queries[visible].double(), query.double())
    return kendall_tau(icl_side, ft_side), icl_side
