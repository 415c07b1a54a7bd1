"""Example MONAI bundles that train with geomed's losses; each folder is a bundle (``configs/``, ``scripts/``,
``docs/``), run with ``python -m monai.bundle run --config_file <bundle>/configs/train.json``."""
