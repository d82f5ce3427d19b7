"""Time one optimizer update on MiniLM-shaped parameters: our AdamW and Lamb against nn.AdamWeightDecay.

Why: the optimizer runs as its own compiled graph after the grad graph (docs/mindspore.md, recipe 1), so its cost
adds to every step; the numbers in ms_nlp_compress/train/README.md come from this script.

    .venv/bin/python scripts/bench_optim.py                    # encoder + embeddings (101 tensors, 22.7M values)
    .venv/bin/python scripts/bench_optim.py --no-word-embedding # the 30522 x 384 table left out (100 tensors)
    .venv/bin/python scripts/bench_optim.py --variants loop     # also the unrolled-Python-loop construct

Reports compile (first call) and the median of the following calls, in ms.
"""
import argparse
import statistics
import time

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from ms_nlp_compress.train.optim import AdamW, Lamb, _adamw_param_update, _lamb_param_update


def minilm_shaped_params(layers=6, hidden=384, ffn=1536, vocab=30522, with_word_embedding=True):
    """Parameters with all-MiniLM-L6-v2 names and shapes; values random (the update cost does not depend on them)."""
    rng = np.random.default_rng(0)
    shapes = {}
    if with_word_embedding:
        shapes["embeddings.word_embeddings.embedding_table"] = (vocab, hidden)
    shapes["embeddings.position_embeddings.embedding_table"] = (512, hidden)
    shapes["embeddings.token_type_embeddings.embedding_table"] = (2, hidden)
    shapes["embeddings.layernorm.gamma"] = (hidden,)
    shapes["embeddings.layernorm.beta"] = (hidden,)
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value", "attention_output"):
            shapes[p + name + ".weight"] = (hidden, hidden)
            shapes[p + name + ".bias"] = (hidden,)
        shapes[p + "attention_layernorm.gamma"] = (hidden,)
        shapes[p + "attention_layernorm.beta"] = (hidden,)
        shapes[p + "intermediate.weight"] = (ffn, hidden)
        shapes[p + "intermediate.bias"] = (ffn,)
        shapes[p + "output.weight"] = (hidden, ffn)
        shapes[p + "output.bias"] = (hidden,)
        shapes[p + "output_layernorm.gamma"] = (hidden,)
        shapes[p + "output_layernorm.beta"] = (hidden,)
    return [Parameter(Tensor(rng.standard_normal(s).astype(np.float32) * 0.02), name=n) for n, s in shapes.items()]


class _LoopAdamW(AdamW):
    """The alternative construct: an unrolled Python loop instead of HyperMap (kept here for the measurement)."""

    _per_param = staticmethod(_adamw_param_update)

    @ms.jit
    def construct(self, gradients):
        lr = self.get_lr()
        step = self.global_step.astype(ms.float32) + 1.0
        bias_correction1 = 1.0 - ms.ops.pow(self.beta1, step)
        bias_correction2 = 1.0 - ms.ops.pow(self.beta2, step)
        lr = ms.ops.depend(lr, self.assignadd(self.global_step, self.global_step_increase_tensor))
        results = ()
        for i in range(self.param_length):
            results += (self._per_param(self.beta1, self.beta2, self.eps, lr, self.decoupled_weight_decay,
                                        bias_correction1, bias_correction2, self._parameters[i],
                                        self.moments1[i], self.moments2[i], gradients[i], self.decay_flags[i]),)
        return results


class _LoopLamb(_LoopAdamW):
    _per_param = staticmethod(_lamb_param_update)


def _time(optimizer, grads, repeats):
    start = time.perf_counter()
    optimizer(grads)
    compile_ms = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer(grads)
        times.append((time.perf_counter() - start) * 1e3)
    return compile_ms, statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-word-embedding", action="store_true")
    parser.add_argument("--mode", choices=("graph", "pynative"), default="graph")
    parser.add_argument("--variants", nargs="*", default=[], choices=("loop",))
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)

    builders = {
        "AdamW (ours, fused)": lambda ps: AdamW(ps, 1e-4),
        "AdamW (ours, elementwise)": lambda ps: AdamW(ps, 1e-4, fused=False),
        "Lamb (ours)": lambda ps: Lamb(ps, 1e-4),
        "nn.AdamWeightDecay": lambda ps: nn.AdamWeightDecay(ps, 1e-4, weight_decay=0.01),
    }
    if "loop" in args.variants:
        builders["AdamW (loop)"] = lambda ps: _LoopAdamW(ps, 1e-4, fused=False)
        builders["Lamb (loop)"] = lambda ps: _LoopLamb(ps, 1e-4)
    for label, build in builders.items():
        params = minilm_shaped_params(with_word_embedding=not args.no_word_embedding)
        grads = tuple(Tensor(np.full(p.shape, 1e-3, np.float32)) for p in params)
        compile_ms, step_ms = _time(build(params), grads, args.repeats)
        values = sum(int(np.prod(p.shape)) for p in params)
        print(f"{args.mode:8s} {label:26s} tensors={len(params):3d} values={values / 1e6:5.1f}M "
              f"first_call={compile_ms:8.0f} ms  step={step_ms:7.1f} ms")


if __name__ == "__main__":
    main()
