"""Where the backbone and decoders run, and in which precision: one place that turns the CLI's
``--device`` and ``--dtype`` into a torch device and dtype.

``--device auto`` is CUDA when torch sees a GPU, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` and
``mps`` are taken as given once checked to exist here. ``--dtype`` defaults to fp16 on CUDA (what
Stable Diffusion is run in: half the memory, tensor cores) and fp32 elsewhere: the CPU's fp16
matmuls are slow or missing, and on the CPU fp32 keeps every earlier result unchanged. bf16 is the
CPU's reduced precision where one is wanted (it has fp32's range, so it needs no loss scaling).
"""

from __future__ import annotations

import torch

from datasetdm.errors import DatasetdmError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
DEVICE_HELP = "auto (CUDA when present, else cpu), cpu, cuda, cuda:N or mps"
DTYPE_HELP = "fp16 | bf16 | fp32 (default: fp16 on CUDA, fp32 elsewhere)"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """A torch device from ``spec``; a DatasetdmError when it is not one or is not here."""
    if isinstance(spec, torch.device):
        return spec
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DatasetdmError(f"--device {spec}: not a device; use {DEVICE_HELP}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DatasetdmError(f"--device {spec}: not available here (torch sees no CUDA GPU); use --device auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DatasetdmError(f"--device {spec}: torch sees {torch.cuda.device_count()} CUDA GPU(s), "
                                 f"numbered from 0")
        return device
    if device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DatasetdmError(f"--device {spec}: not available here (no Apple GPU); use --device auto or cpu")
        return device
    raise DatasetdmError(f"--device {spec}: not supported; use {DEVICE_HELP}")


def resolve_dtype(spec: str | torch.dtype | None, device: str | torch.device | None = "auto") -> torch.dtype:
    """The compute dtype named by ``spec`` (fp16, bf16, fp32), or the default for ``device``."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise DatasetdmError(f"--dtype {spec}: use one of {', '.join(DTYPES)}")
        return spec
    if spec is None or str(spec).strip().lower() in ("", "auto"):
        return torch.float16 if resolve_device(device).type == "cuda" else torch.float32
    text = str(spec).strip().lower()
    text = _ALIASES.get(text, text)
    if text not in DTYPES:
        raise DatasetdmError(f"--dtype {spec}: use one of {', '.join(DTYPES)}")
    return DTYPES[text]


def placement(device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = None
              ) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for the CLI's ``--device`` and ``--dtype``, checked and defaulted together."""
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def dtype_name(dtype: torch.dtype) -> str:
    """``fp16``, ``bf16`` or ``fp32``: how runs and benches record a dtype."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    return str(dtype).replace("torch.", "")


def autocast(device: torch.device, dtype: torch.dtype):
    """torch.autocast on ``device`` in ``dtype``, or a no-op context for fp32: the mixed precision
    the decoder runs in (its parameters stay fp32; matmuls and convolutions run in ``dtype``,
    softmax, norms and losses stay fp32, which is what keeps fp16 outputs correct)."""
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
