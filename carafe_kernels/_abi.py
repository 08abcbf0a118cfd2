"""The torch release the compiled extension targets (PyTorch's stable ABI, docs/design.md#the-build).

One place for the number: setup.py compiles with ``-DTORCH_TARGET_VERSION`` from it (the headers then
refuse any API newer than that release), and carafe_kernels/_native.py refuses to load the extension on
an older torch, whose stable C shim lacks functions the extension calls. This file imports nothing, so
setup.py can read it without importing the package.

Why 2.10: the first release whose stable ABI has everything the glue needs: ``torch::stable::parallel_for``
and ``get_num_threads`` (the CPU kernels' threading), ``mutable_data_ptr``/``const_data_ptr``,
``aten::empty``/``contiguous`` through the dispatcher shim, and ``std::string``/``std::vector`` op
results (_built_with_torch, _native_limits). 2.9's stable ABI has none of the first three.
"""
STABLE_ABI_TARGET = (2, 10)


def target_version_macro(target: tuple[int, int] = STABLE_ABI_TARGET) -> str:
    """TORCH_TARGET_VERSION for (major, minor): major in the top byte, minor in the next, as
    torch/csrc/stable/version.h builds it (2.10 -> 0x020a000000000000)."""
    major, minor = target
    return f"0x{(major << 56) | (minor << 48):016x}"
