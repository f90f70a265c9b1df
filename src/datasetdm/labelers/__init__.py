"""Layer 4: labelers turn a generated image and its captured hypercolumns into labels.

- ``decoder``: trained P-Decoders (DatasetDM, paper §3.5);
- ``attention``: the training-free labeler from the model's own attention (Dataset Diffusion).
"""

from datasetdm.labelers.decoder import decoder_annotator, labels_from_predictions

__all__ = ["decoder_annotator", "labels_from_predictions"]
