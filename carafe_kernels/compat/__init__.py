"""Compatibility layers for code written against other libraries (see :mod:`carafe_kernels.compat.mmcv`)."""
