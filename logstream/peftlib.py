"""peft, imported without bitsandbytes in processes that cannot use it (import peft from here).

peft imports bitsandbytes whenever it is installed (`peft.helpers`, the LoRA layer dispatchers),
and bitsandbytes probes its CPU kernels on import: on CPUs with AVX512-BF16 it logs "Failed to load
CPU gemm_4bit_forward ... pip install kernels" on every LogLLM or trainer start, and adds about a
second of imports, for a library that only the 4-bit (NF4) path uses, and that path needs CUDA
(`--load-in-4bit` is refused elsewhere).

This module runs `hide_bitsandbytes_without_cuda()` and then imports peft. Without CUDA
it marks bitsandbytes as not importable for this process (`sys.modules[name] = None`, Python's own
import-blocking convention: `import` raises ImportError and `importlib.util.find_spec` returns
None), so peft and transformers take their "bitsandbytes not installed" paths. With CUDA nothing
changes and QLoRA works as before.
"""

from __future__ import annotations

import sys

MODULE = "bitsandbytes"


def hide_bitsandbytes_without_cuda() -> bool:
    """Hide bitsandbytes from this process unless CUDA is available; True when it is hidden.

    Idempotent. Does nothing when bitsandbytes was imported already (someone needed it).
    """
    if MODULE in sys.modules:
        return sys.modules[MODULE] is None
    import torch

    if torch.cuda.is_available():
        return False
    sys.modules[MODULE] = None  # type: ignore[assignment]  # the documented way to block an import
    return True


hide_bitsandbytes_without_cuda()
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402 - after the guard

__all__ = ["LoraConfig", "PeftModel", "get_peft_model", "hide_bitsandbytes_without_cuda",
           "prepare_model_for_kbit_training"]
