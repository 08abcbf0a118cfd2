"""cares: CARes-UNet (Xu et al., Med Phys 2021) and its baselines for COVID-19 lesion segmentation in CT."""
__version__ = "0.1.0"
