"""Loss Cells the train step differentiates. Each maps batch tensors to a scalar; distillation adds its own."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


def cross_entropy(logits, labels):
    """Mean negative log-likelihood of integer labels under softmax(logits). logits (B, C), labels (B,)."""
    log_probs = ops.log_softmax(logits.astype(ms.float32), -1)  # (B, C)
    picked = ops.gather_elements(log_probs, 1, labels.astype(ms.int32).reshape(-1, 1))  # (B, 1)
    return -picked.mean()


class SequenceClassificationLoss(nn.Cell):
    """Cross-entropy for classification, mean squared error for regression (num_labels == 1)."""

    def __init__(self, model: nn.Cell):
        super().__init__(auto_prefix=False)
        self.model = model
        self.regression = model.num_labels == 1

    def construct(self, input_ids, attention_mask, token_type_ids, labels):
        logits = self.model(input_ids, attention_mask, token_type_ids)[0]  # (B, C)
        if self.regression:
            error = logits.astype(ms.float32).reshape(-1) - labels.astype(ms.float32)
            return (error * error).mean()
        return cross_entropy(logits, labels)


class MaskedLMLoss(nn.Cell):
    """Mean cross-entropy over the predicted positions. Padding predictions carry weight 0.

    Inputs: input_ids, attention_mask, token_type_ids (B, L); masked_positions, masked_ids (B, P) int32;
    masked_weights (B, P) float32 (1 for a real prediction, 0 for padding).
    """

    def __init__(self, model: nn.Cell):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, attention_mask, token_type_ids, masked_positions, masked_ids, masked_weights):
        logits = self.model(input_ids, attention_mask, token_type_ids, masked_positions)[0]  # (B, P, V)
        log_probs = ops.log_softmax(logits.astype(ms.float32), -1)
        picked = ops.gather_elements(log_probs, 2, masked_ids.astype(ms.int32).expand_dims(-1)).squeeze(-1)  # (B, P)
        weights = masked_weights.astype(ms.float32)
        return -(picked * weights).sum() / ops.maximum(weights.sum(), 1.0)
