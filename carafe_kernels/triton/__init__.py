"""Triton backend (being written). Contract with the registry: `unavailable_reason() -> str | None`,
`carafe(features, masks, k, G, s)` and `carafe_fused(features, mask_logits, k, G, s)`."""


def unavailable_reason():
    return "the Triton kernels are not implemented yet"
