"""Make bitsandbytes believe this CPU has AVX512-BF16, in every Python process of the test suite.

bitsandbytes (0.50) decides per ``Linear4bit`` module, from ``has_avx512bf16()`` at construction,
whether an inference-style forward on CPU repacks the 4-bit weight into a CPU-only layout. That path
exists only on some processors, so a suite that passes on one machine can fail on another. The test
suite puts this directory on ``PYTHONPATH`` (``tests/conftest.py``): Python imports this module at
start-up in the pytest process and in every process it starts (spawned ranks, torchrun, Ray workers),
and the hook below switches the decision on as soon as ``bitsandbytes.nn.modules`` is imported. The
project must then be correct as it would be on such a processor.

A second hook keeps DeepSpeed from JIT-building its CPU shm communication op in the processes that set
DeepSpeed up themselves (the examples, the HF/accelerate/sentence-transformers workers, GradCache's
ranks): ``deepspeed.comm.torch.build_shm_op`` returns None, as it does when the op is incompatible. The
product's own processes skip the op by themselves (``distributed.env.skip_deepspeed_shm_op``; its test
runs without this directory on ``PYTHONPATH``). The op only serves DeepSpeed-Inference, and building it
costs about a minute of CPU in a fresh CI machine.

Neither bitsandbytes nor DeepSpeed is imported here (that would slow every Python start-up).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _bnb_has_avx512bf16(module) -> None:  # noqa: ANN001
    module.has_avx512bf16 = lambda: True


def _no_deepspeed_shm_op(module) -> None:  # noqa: ANN001
    module.build_shm_op = lambda: None


_PATCHES = {"bitsandbytes.nn.modules": _bnb_has_avx512bf16, "deepspeed.comm.torch": _no_deepspeed_shm_op}


class _PatchAfterLoad(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, patch) -> None:  # noqa: ANN001
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):  # noqa: ANN001
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self._loader.exec_module(module)
        self._patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001
        if fullname not in _PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchAfterLoad(spec.loader, _PATCHES[fullname])
        return spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
