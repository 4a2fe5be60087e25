from vilbert.modeling.outputs import ViLBERTModelOutput, ViLBERTPretrainingOutput, ViLBERTTaskOutput
from vilbert.modeling.single_stream import SingleStreamForPretraining, SingleStreamForTasks, SingleStreamModel
from vilbert.modeling.vilbert import ViLBERTForPretraining, ViLBERTForTasks, ViLBERTModel, ViLBERTPreTrainedModel

__all__ = ["ViLBERTModel", "ViLBERTForPretraining", "ViLBERTForTasks", "ViLBERTPreTrainedModel",
           "SingleStreamModel", "SingleStreamForPretraining", "SingleStreamForTasks",
           "ViLBERTModelOutput", "ViLBERTPretrainingOutput", "ViLBERTTaskOutput"]
