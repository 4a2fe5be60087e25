"""ViLBERT: two-stream vision-and-language BERT, pretraining and fine-tuning at scale."""

from vilbert.config import PRESETS, ViLBERTConfig
from vilbert.modeling import (
    SingleStreamForPretraining,
    SingleStreamModel,
    ViLBERTForPretraining,
    ViLBERTForTasks,
    ViLBERTModel,
)

__all__ = ["ViLBERTConfig", "PRESETS", "ViLBERTModel", "ViLBERTForPretraining", "ViLBERTForTasks",
           "SingleStreamModel", "SingleStreamForPretraining"]
__version__ = "0.1.0"
