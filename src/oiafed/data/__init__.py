"""Datasets, partitioners and the federation's data."""
