"""ICL as implicit finetuning (Dai et al.): the relaxed-attention split into W_ZSL and dW_ICL, the finetuned baseline, the ICL-vs-finetuning metrics, and momentum attention."""
