"""Tasks, k-shot prompts with exact token positions, the prompt conditions of a study, and the synthetic mixture-of-HMMs world."""
