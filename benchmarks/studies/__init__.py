"""Studies of one question each (does the paper's Sinkhorn initialisation converge faster?), with their
tables in ``benchmarks/results/``."""
