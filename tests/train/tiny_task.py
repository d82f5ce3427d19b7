"""A tiny, learnable classification task and trainer used by the trainer tests and the kill -9 worker."""
import numpy as np

from ms_nlp_compress.config import ExperimentConfig, NezhaConfig, TrainConfig
from ms_nlp_compress.models.dropout import set_dropout_seed
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification
from ms_nlp_compress.train.batches import ArrayBatches
from ms_nlp_compress.train.losses import SequenceClassificationLoss
from ms_nlp_compress.train.trainer import Trainer

ORDER = ("input_ids", "attention_mask", "token_type_ids", "label")


def columns(size=48, length=8, seed=0):
    """Label 1 when token 5 occurs: learnable by a tiny model in a few dozen steps."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(6, 30, (size, length)).astype(np.int32)
    label = rng.integers(0, 2, size).astype(np.int32)
    for row in np.nonzero(label)[0]:
        ids[row, rng.integers(1, length)] = 5
    ids[:, 0] = 2
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
            "label": label}


def build(output_dir, seed=0, kernels="auto", rows=48, **train_overrides):
    import mindspore as ms

    ms.set_seed(seed)
    set_dropout_seed(seed)
    model_config = NezhaConfig(vocab_size=30, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                               max_relative_position=4, hidden_dropout=0.1, attention_dropout=0.1,
                               kernels=kernels)
    train = dict(learning_rate=3e-3, max_steps=8, save_every=2, eval_every=4, log_every=1, warmup_ratio=0.25)
    train.update(train_overrides)
    config = ExperimentConfig(model=model_config, train=TrainConfig(**train))
    config.runtime.seed = seed
    model = NezhaForSequenceClassification(model_config, 2)
    data = columns(size=rows)
    batches = ArrayBatches(data, ORDER, batch_size=8, seed=seed)

    def evaluate():
        from ms_nlp_compress.train.finetune import predict_logits
        from ms_nlp_compress.train.metrics import compute_metrics

        logits = predict_logits(model, data, batch_size=10)
        return {k: float(v) for k, v in compute_metrics("sst2", logits.argmax(-1), data["label"]).items()}

    trainer = Trainer(config, model, SequenceClassificationLoss(model), batches, output_dir, evaluate=evaluate,
                      metric="acc", log=lambda message: None)
    return trainer, model


def weights(model):
    return {name: param.asnumpy().copy() for name, param in model.parameters_and_names()}
