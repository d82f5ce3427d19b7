"""The same-batch gradient sum: one loss Cell over every (width, depth) sub-network of a batch.

The reference loops over depths and widths, calling backward on each sub-network's loss so gradients accumulate
(summed, not averaged), then clips once and steps once (algorithms.md 3.4). Here the loop is unrolled inside one
Cell: its loss is the SUM of every sub-network's `Distiller` loss, so the engine's ordinary `TrainStep` (one
value_and_grad, global-norm clip, one optimizer call) differentiates the sum, which by linearity is the sum of the
sub-networks' gradients. This is not the engine's gradient accumulation, which averages different batches and
returns to the host between micro-batches; here there is one graph and one host round trip per update.

Two ways to compile that sum (`dynabert.graph`). `single`: one graph over `construct` below (every sub-network
unrolled into one gradient graph). `separate` (default): the loss cell exposes its distillers as `separate_members`
and the engine's `TrainStep` builds one gradient graph per member, SUMS their gradients, then reduces, clips and
steps once: the same update, but only one sub-network's graph and activations are alive at a time (on CPU the
single graph needed 5.2 GB to compile one MiniLM-shape sub-network and more than 11.7 GB for 12: README).

Each sub-network distils from its teacher with DynaBERT's terms: logits_weight * soft cross-entropy of the logits +
hidden_weight * (MSE of the embedding outputs + sum of MSEs of the matched hidden states), student state j matched
with teacher state floor(j / d) (`depth_layer_mapping`); no attention term, no projection (equal widths).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import mindspore as ms
from mindspore import nn, ops

from ms_nlp_compress.compress.distill.distiller import Distiller, HiddenProjection
from ms_nlp_compress.compress.dynabert.config import GRAPHS, DynaBertConfig
from ms_nlp_compress.compress.dynabert.elastic import ElasticModel, names_kept
from ms_nlp_compress.compress.dynabert.sizes import depth_layer_mapping
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.train.losses import cross_entropy

# A teacher for every sub-network: one Cell (the fine-tuned full model, or full-width DynaBERT_W), a callable
# (width, depth) -> Cell (stage 2's same-width DynaBERT_W sub-network), or None (stage `final`: labels only).
Teacher = Optional[Union[nn.Cell, Callable[[float, float], nn.Cell]]]


class LabelLoss(nn.Cell):
    """One sub-network's ground-truth loss, no teacher (the final fine-tuning stage): cross-entropy with the labels,
    or MSE to them for a one-output regression head. Returns (loss, (loss,)) like a Distiller."""

    component_names = ("label",)

    def __init__(self, student: nn.Cell, regression: bool = False):
        super().__init__(auto_prefix=False)
        self.student = student
        self.regression = bool(regression)

    def construct(self, input_ids, attention_mask, token_type_ids, labels):
        logits = self.student(input_ids, attention_mask, token_type_ids)[0].astype(ms.float32)
        if self.regression:
            error = logits.reshape(-1) - labels.astype(ms.float32)
            loss = (error * error).mean()
        else:
            loss = cross_entropy(logits, labels)
        return loss, (loss,)


class DynaBertLoss(nn.Cell):
    """(sum of sub-network losses, (loss of each sub-network, ...)) for one batch.

    Args:
        elastic: the student's ElasticModel (its `model` is what the optimizer trains and the trainer saves).
        teacher: see `Teacher`; it must return hidden states (built with output_hidden_states=True). None: each
            sub-network learns from the labels alone (`LabelLoss`; the weights are then unused).
        widths, depths: the sub-networks, visited depth-major in the order given (the reference: descending).
        logits_weight, hidden_weight: DynaBERT's lambda1, lambda2.
        regression: one-output head: MSE to the teacher's output instead of soft cross-entropy.
        graph: "separate" (the engine compiles one gradient graph per sub-network and sums them: the attribute
            `separate_members` holds the distillers) or "single" (one graph over `construct`'s sum).
    """

    def __init__(self, elastic: ElasticModel, teacher: Teacher, widths: Sequence[float], depths: Sequence[float],
                 logits_weight: float = 1.0, hidden_weight: float = 0.1, regression: bool = False,
                 graph: str = "separate"):
        super().__init__(auto_prefix=False)
        if not widths or not depths:
            raise ConfigError("dynabert: no sub-network to train (empty width or depth list)")
        if graph not in GRAPHS:
            raise ConfigError(f"dynabert.graph: must be one of {GRAPHS}, got {graph!r}")
        hidden_size = elastic.config.hidden_size
        num_layers = elastic.config.num_layers
        distillers, names = [], []
        # Distiller assigns each student as an attribute, which renames the shared Parameters: restore them.
        with names_kept(elastic.model):
            for depth in depths:
                mapping = depth_layer_mapping(num_layers, depth)
                for width in widths:
                    student = elastic.subnetwork(width, depth, hidden_states=True)
                    names.append(elastic.shape(width, depth).name)
                    if teacher is None:
                        distillers.append(LabelLoss(student, regression))
                        continue
                    teacher_cell = teacher if isinstance(teacher, nn.Cell) else teacher(width, depth)
                    distillers.append(Distiller(
                        teacher_cell, student, mapping,
                        HiddenProjection("none", hidden_size, hidden_size, len(mapping.hidden_pairs())),
                        embedding_weight=hidden_weight, hidden_weight=hidden_weight, attention_weight=0.0,
                        prediction_weight=logits_weight, regression=regression))
            self.distillers = nn.CellList(distillers)
        self.component_names = tuple(names)
        self.elastic = elastic
        self.graph = graph

    @property
    def separate_members(self):
        """The distillers in `separate` mode (TrainStep: one gradient graph per member, gradients summed), else ()
        (one graph over `construct`). A property over the child cells, so a mixed-precision copy of this cell
        yields its own copies."""
        return tuple(self.distillers) if self.graph == "separate" else ()

    def trainable_cells(self):
        """What the trainer optimizes and checkpoints: the full student model (never a teacher)."""
        return (self.elastic.model,)

    def construct(self, input_ids, attention_mask, token_type_ids, labels=None):
        total = ops.zeros((), ms.float32)
        losses = ()
        for distiller in self.distillers:
            loss, _ = distiller(input_ids, attention_mask, token_type_ids, labels)
            total = total + loss
            losses = losses + (loss,)
        return total, losses


def build_loss(elastic: ElasticModel, config: DynaBertConfig, teacher: Teacher,
               regression: bool = False) -> DynaBertLoss:
    """The stage's loss from the `dynabert:` section: widths and depths (stage `width`: depth 1.0 only), weights,
    graph mode. Stage `final` ignores `teacher`: every sub-network learns from the labels."""
    config.validate()
    logits_weight, hidden_weight = config.loss_weights()
    return DynaBertLoss(elastic, None if config.stage == "final" else teacher, config.widths(), config.depths(),
                        logits_weight, hidden_weight,
                        regression, config.graph)


def stage2_teacher(teacher_elastic: ElasticModel, config: DynaBertConfig) -> Teacher:
    """Stage 2's teacher from a trained DynaBERT_W: the same-width sub-network at full depth (the paper) or the
    full-width model (the reference code), per `dynabert.teacher`."""
    if config.teacher == "full_width":
        return teacher_elastic.subnetwork(1.0, 1.0, hidden_states=True)

    def same_width(width: float, depth: float) -> nn.Cell:
        return teacher_elastic.subnetwork(width, 1.0, hidden_states=True)

    return same_width

