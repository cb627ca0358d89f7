"""Without a GPU, the Triton kernels run on CPU in Triton's interpreter (fp32 only there).

Triton reads TRITON_INTERPRET when a function is decorated with ``@triton.jit``: for the
kernels of ``fused.py``, when ``kdscale.kernels`` first imports it (on the first
``kd_loss_triton`` call, inside a test), but for triton's own library functions (``tl.sum``,
``tl.max``, ``tl.zeros``, ...) when triton is imported, and ``torch._dynamo`` (here through
transformers, in tests/conftest.py) imports triton before this file is read. So for this
folder's tests the variable is set and those library functions are rebuilt as interpreted
ones; both are undone when the folder is done, so other tests never see the interpreter.
"""

import os
import sys

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _triton_interpreter_without_gpu():
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        _interpret_triton_library(patch)
        yield


def _interpret_triton_library(patch):
    """Replaces each @triton.jit function of triton.language (built when triton was imported,
    for GPUs) by an interpreted one, wherever the language modules bind it."""
    import triton.language  # noqa: F401  (imported as it would be without the interpreter)
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    interpreted = {}
    modules = [m for name, m in list(sys.modules.items()) if name.startswith("triton.language")]
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                if id(value) not in interpreted:
                    interpreted[id(value)] = InterpretedFunction(value.fn)
                patch.setattr(module, name, interpreted[id(value)])
