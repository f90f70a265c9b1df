"""P-Decoder (paper §3.4): reads hypercolumns, predicts masks, instances, depth or pose."""

from datasetdm.decoder.build import BUILDERS, DecoderConfig, PDecoder, build_decoder
from datasetdm.decoder.heads import HEADS, TASKS
from datasetdm.decoder.inputs import DecoderInput

__all__ = ["BUILDERS", "DecoderConfig", "DecoderInput", "HEADS", "PDecoder", "TASKS", "build_decoder"]
