"""MONAI adapters for geomed: losses, transforms and metrics that follow MONAI's conventions.

This package holds no maths; every number comes from :mod:`geomed`. Its classes arrive with their own issue;
for now it is an importable shell, so that ``import monai_losses`` works in a fresh environment.
"""
