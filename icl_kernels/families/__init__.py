"""Other head families and causal tests: induction and previous-token heads, function vectors, task vectors, label-word anchors, and ablation or patching of top heads."""
