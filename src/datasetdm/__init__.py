"""datasetdm: text-to-data with diffusion models (DatasetDM, Dataset Diffusion)."""

__version__ = "0.1.0"

from datasetdm.errors import DatasetdmError  # noqa: E402

__all__ = ["DatasetdmError", "__version__"]
