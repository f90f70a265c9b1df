"""P-Decoder (paper §3.4): reads hypercolumns, predicts masks, instances, depth or pose.

Public API: ``load_decoder(path)`` → ``PDecoder`` (``.cfg.task``, ``.cfg.categories``,
``.predict(DecoderInput)``, ``.predict_hypercolumns(hc, images, tokenizer)``), ``save_decoder``,
``build_decoder(DecoderConfig)``; ``Predictor(backbone, {task: decoder})``: one UNet pass, every
decoder answered (``decoder/predictor.py``).
"""

from datasetdm.decoder.build import BUILDERS, DecoderConfig, PDecoder, build_decoder, check_backbone
from datasetdm.decoder.checkpoint import load_decoder, read_config, save_decoder
from datasetdm.decoder.heads import HEADS, TASKS
from datasetdm.decoder.inputs import DecoderInput
from datasetdm.decoder.predictor import Predictor

__all__ = [
    "BUILDERS", "DecoderConfig", "DecoderInput", "HEADS", "PDecoder", "Predictor", "TASKS", "build_decoder",
    "check_backbone", "load_decoder", "read_config", "save_decoder",
]
