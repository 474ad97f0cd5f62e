"""Refusing vector-quantize-pytorch options the vqkernels layers do not implement.

A layer takes the keywords it supports explicitly; the ones it does not are listed here with
vector-quantize-pytorch's defaults. Passing one at its default is harmless and accepted;
any other value raises, so an option is never silently ignored.
"""

_MISSING = object()


def reject_unsupported(layer, given, unsupported):
    """``given``: the extra keywords passed; ``unsupported``: {name: vector-quantize-pytorch default}."""
    for name, value in given.items():
        default = unsupported.get(name, _MISSING)
        if default is _MISSING:
            raise TypeError(f"{layer}: unknown keyword argument {name!r}")
        if value is not default and value != default:
            raise ValueError(f"{layer}: option {name}={value!r} is not supported by vqkernels "
                             f"(only its default {default!r} is)")
