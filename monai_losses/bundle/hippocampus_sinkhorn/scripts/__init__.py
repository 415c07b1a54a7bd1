"""Helpers of the hippocampus_sinkhorn bundle, imported by its configs as a module of the installed package."""
