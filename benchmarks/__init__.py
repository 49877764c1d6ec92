"""Benchmarks: vector search, training and serving."""
