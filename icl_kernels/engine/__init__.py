"""Running a model on prompts: hook names and attention geometry, the batched capture, the one edit engine, prefix reuse, label scoring, accuracy and perplexity."""
