"""MONAI bundle: a small 3-D UNet segmenting both hippocampi of the MNI152 T1 crop with ``DiceSinkhornLoss``."""
