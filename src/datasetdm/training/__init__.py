"""Layer 4: few-shot training of the P-Decoder (paper §3.2 and §3.4): views of the labelled images
(``views``), their hypercolumns computed once and cached (``features``), and the trainer."""

from datasetdm.training.features import (
    EMBEDDED,
    FeatureSource,
    backbone_from_record,
    cached_inputs,
    load_feature_source,
)
from datasetdm.training.trainer import (
    Prepared,
    TrainOptions,
    Trainer,
    check_options,
    check_out,
    make_decoder_config,
    prepare,
    train_decoder,
    train_decoders,
)
from datasetdm.training.views import (
    PROMPT_MODES,
    augment,
    build_views,
    check_task_data,
    check_task_labels,
    folder_categories,
    present_category_ids,
    prompt_for,
    resolve_prompt_mode,
    view_noise_seeds,
)

__all__ = [
    "EMBEDDED",
    "FeatureSource",
    "PROMPT_MODES",
    "Prepared",
    "TrainOptions",
    "Trainer",
    "augment",
    "backbone_from_record",
    "build_views",
    "cached_inputs",
    "check_options",
    "check_out",
    "check_task_data",
    "check_task_labels",
    "folder_categories",
    "load_feature_source",
    "make_decoder_config",
    "prepare",
    "present_category_ids",
    "prompt_for",
    "resolve_prompt_mode",
    "train_decoder",
    "train_decoders",
    "view_noise_seeds",
]
