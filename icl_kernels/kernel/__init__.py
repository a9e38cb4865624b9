"""ICL as kernel regression (Han et al.): head scores from label attention, kernel-regression baselines, probes, and Theorem 1 on the synthetic world."""
