"""Per-rank checkpoint state (train/checkpoints.py): round trip, refusals that name the file, pruning, and the
Trainer's use of it in one process (the 2-rank resume is test_lowbit_rank_resume.py)."""
import sys
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn

from ms_nlp_compress.errors import CheckpointError
from ms_nlp_compress.models.checkpoint import read_safetensors
from ms_nlp_compress.train.checkpoints import (LATEST, load_rank_state, rank_state_path, save_checkpoint,
                                               save_rank_state)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))


class Holder(nn.Cell):
    def __init__(self, residual, counter):
        super().__init__()
        self.residual = Parameter(Tensor(residual), name="residual", requires_grad=False)
        self.counter = Parameter(Tensor(counter, ms.int32), name="counter", requires_grad=False)


def holder(seed):
    rng = np.random.default_rng(seed)
    return Holder(rng.normal(size=(5, 3)).astype(np.float32), int(rng.integers(1, 100)))


def test_each_rank_gets_back_its_own_state(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-0000004").mkdir(parents=True)
    written = [holder(rank) for rank in range(3)]
    for rank, cell in enumerate(written):
        save_rank_state(root, "step-0000004", rank, 3, [cell])
    for rank in range(3):
        fresh = holder(100 + rank)
        assert load_rank_state(root / "step-0000004", rank, 3, [fresh]) == rank_state_path(root, "step-0000004", rank)
        np.testing.assert_array_equal(fresh.residual.asnumpy(), written[rank].residual.asnumpy())
        assert int(fresh.counter.asnumpy()) == int(written[rank].counter.asnumpy())
    assert not np.array_equal(written[0].residual.asnumpy(), written[1].residual.asnumpy())


def test_refusals_name_the_file(tmp_path):
    root = tmp_path / "checkpoints"
    for rank in (0, 1):
        save_rank_state(root, "step-0000002", rank, 2, [holder(rank)])
    checkpoint = root / "step-0000002"
    # another world size: 2-rank files cannot be spread over 1 or 4 ranks
    with pytest.raises(CheckpointError, match=r"rank 0 of 2 .* rank 0 of 1") as caught:
        load_rank_state(checkpoint, 0, 1, [holder(5)])
    assert str(rank_state_path(root, "step-0000002", 0)) in str(caught.value)
    with pytest.raises(CheckpointError) as caught:
        load_rank_state(checkpoint, 3, 4, [holder(5)])
    assert str(rank_state_path(root, "step-0000002", 3)) in str(caught.value) and "missing" in str(caught.value)
    # a peer's file missing: this rank refuses too (same verdict on every rank), naming the peer's file
    rank_state_path(root, "step-0000002", 1).unlink()
    with pytest.raises(CheckpointError, match="incomplete") as caught:
        load_rank_state(checkpoint, 0, 2, [holder(5)])
    assert str(rank_state_path(root, "step-0000002", 1)) in str(caught.value)
    # a file from another checkpoint renamed into place
    save_rank_state(root, "step-0000001", 1, 2, [holder(1)])
    rank_state_path(root, "step-0000001", 1).rename(rank_state_path(root, "step-0000002", 1))
    with pytest.raises(CheckpointError, match="for checkpoint step-0000001"):
        load_rank_state(checkpoint, 1, 2, [holder(5)])
    # a file for a different cell layout names the tensor
    save_rank_state(root, "step-0000002", 1, 2, [Holder(np.zeros((2, 2), np.float32), 0)])
    with pytest.raises(CheckpointError, match="shape mismatch: residual"):
        load_rank_state(checkpoint, 1, 2, [holder(5)])


def test_prune_drops_rank_files_of_dropped_checkpoints_only(tmp_path):
    root = tmp_path / "checkpoints"
    model, optimizer = holder(0), holder(1)
    for update in (1, 2, 3):
        for rank in (0, 1):
            save_rank_state(root, f"step-{update:07d}", rank, 2, [holder(rank)])
        save_checkpoint(root, f"step-{update:07d}", model, [], {"updates": update}, keep=2)
    # rank 1 has already written its file for the next checkpoint, which rank 0 has not published yet
    save_rank_state(root, "step-0000004", 1, 2, [holder(1)])
    save_checkpoint(root, "step-0000003", model, [optimizer], {"updates": 3}, keep=2)  # re-save: prune again
    names = sorted(p.name for p in root.iterdir())
    assert names == [LATEST, "step-0000002", "step-0000002.rank0.safetensors", "step-0000002.rank1.safetensors",
                     "step-0000003", "step-0000003.rank0.safetensors", "step-0000003.rank1.safetensors",
                     "step-0000004.rank1.safetensors"], names


def test_trainer_keeps_error_feedback_state_out_of_rank_zero_files(tmp_path, graph_mode):
    import tiny_task
    from ms_nlp_compress.parallel.comm_config import CommConfig
    from ms_nlp_compress.parallel.lowbit import LowBitAllGatherReducer
    from ms_nlp_compress.train.losses import SequenceClassificationLoss
    from ms_nlp_compress.train.trainer import Trainer

    def trainer_for(output):
        trainer, model = tiny_task.build(output, max_steps=2, save_every=2, eval_every=0)
        reducer = LowBitAllGatherReducer(model.trainable_params(), CommConfig(scheme="allgather", gradient_bits=2,
                                                                              error_feedback=True), world_size=1)
        return Trainer(trainer.config, model, SequenceClassificationLoss(model), trainer.batches, output,
                       log=lambda message: None, reducer=reducer), reducer

    trainer, reducer = trainer_for(tmp_path / "run")
    trainer.fit()
    checkpoints = tmp_path / "run" / "checkpoints"
    own = read_safetensors(rank_state_path(checkpoints, "step-0000002", 0))
    np.testing.assert_array_equal(own["residual"], reducer.residual.asnumpy())
    assert np.abs(own["residual"]).max() > 0
    assert "residual" not in read_safetensors(checkpoints / "step-0000002" / "optimizer.safetensors")
    resumed, resumed_reducer = trainer_for(tmp_path / "run")
    assert resumed.resume() == str(checkpoints / "step-0000002")
    np.testing.assert_array_equal(resumed_reducer.residual.asnumpy(), reducer.residual.asnumpy())
    rank_state_path(checkpoints, "step-0000002", 0).unlink()
    again, _ = trainer_for(tmp_path / "run")
    with pytest.raises(CheckpointError, match="step-0000002.rank0.safetensors"):
        again.resume()
