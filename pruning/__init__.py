"""Sparsity core: masks, prunable-parameter rules, selection, rank agreement and the methods."""
