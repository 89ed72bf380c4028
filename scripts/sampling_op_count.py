"""How much work the sampling side of one decode step does, on the CPU: the torch ops (each one
a kernel launch on a GPU), the Triton launches, and how many of them touch a [B, vocab] tensor
(a "pass": at B = 64 and Qwen2.5-7B's 152,064 ids, 39 MB of float32, ~10 us at 4 TB/s).

    TRITON_INTERPRET=1 python scripts/sampling_op_count.py [--batch 64] [--vocab 152064]

It decodes a tiny random Qwen2 with the given vocabulary, every request asking for what
`bench latency`'s -sampling modes ask (logprobs=5, presence/frequency/repetition penalties,
greedy), and counts inside the runner's `_sample_and_share` of the last decode step: once on
the torch path (what a CPU runs), once with the Triton kernels (interpreted here; what a GPU
with the Triton backend runs). Counts, not times: the interpreter's speed says nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLING = {
    "logprobs": 5,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.1,
}

# Ops that only make a view (no kernel on a GPU).
VIEWS = {"slice", "view", "expand", "unsqueeze", "squeeze", "as_strided", "alias", "t",
         "transpose", "select", "detach", "reshape", "_unsafe_view", "permute"}  # fmt: skip

SPARSE = {"gather", "scatter", "scatter_", "scatter_add_", "index_put_"}


class OpCounter(TorchDispatchMode):
    def __init__(self, big: int) -> None:
        super().__init__()
        self.big = big
        self.ops: list[tuple[str, int]] = []  # (op, bytes of its [B, V]-sized tensors)
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        no_kernel = name in VIEWS or (args and out is args[0] and name == "to")
        if not self.paused and not no_kernel:
            tensors = [
                t
                for t in torch.utils._pytree.tree_leaves((args, kwargs, out))
                if isinstance(t, torch.Tensor)
            ]
            # A gather or scatter touches as many entries as its index has, not its whole input.
            big = [t for t in tensors if t.numel() >= self.big and name not in SPARSE]
            moved = sum(t.numel() * t.element_size() for t in big)
            self.ops.append((name, moved))
        return out


def _tiny_model(vocab: int, path: Path) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    tf.Qwen2ForCausalLM(cfg).eval().save_pretrained(path)
    return path


def count(model: Path, batch: int, vocab: int, use_triton: bool) -> dict:
    from graphwise import LLM, SamplingParams
    from graphwise.runner.model_runner import ModelRunner

    try:
        from graphwise.kernels import sampling as kernels
    except ImportError:  # a checkout from before the kernels: its torch path only
        kernels = None
        if use_triton:
            return {}

    counter = OpCounter(big=batch * vocab // 2)
    launches: list[tuple[str, int]] = []
    calls: list[list] = []
    original = ModelRunner._sample_and_share
    wrapped = {}

    def launcher(name: str, kernel):
        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    big = [
                        a for a in args if isinstance(a, torch.Tensor) and a.numel() >= counter.big
                    ]
                    moved = sum(a.numel() * a.element_size() for a in big)
                    if name == "_penalties_kernel":  # the logits are written back too
                        moved += big[0].numel() * big[0].element_size()
                    launches.append((name, moved))
                    counter.paused = True  # the interpreter's own copies are not the GPU's
                    try:
                        return kernel[grid](*args, **kw)
                    finally:
                        counter.paused = False

                return run

        return Launch()

    for name in ("_penalties_kernel", "_rank_topk_kernel") if kernels is not None else ():
        wrapped[name] = getattr(kernels, name)
        setattr(kernels, name, launcher(name, wrapped[name]))

    def counted(self, logits, inputs, *rest, **kw):
        self.triton_sampling = use_triton
        counter.ops.clear()
        launches.clear()
        with counter:
            out = original(self, logits, inputs, *rest, **kw)
        calls.append([list(counter.ops), list(launches)])
        return out

    ModelRunner._sample_and_share = counted  # type: ignore[method-assign]
    try:
        llm = LLM(model=str(model), max_num_seqs=batch, max_model_len=64)
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, **SAMPLING)
        prompts = [
            {"prompt_token_ids": [(7 * i + j) % vocab for j in range(8)]} for i in range(batch)
        ]
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        ModelRunner._sample_and_share = original  # type: ignore[method-assign]
        for name, kernel in wrapped.items():
            setattr(kernels, name, kernel)
    ops, triton_launches = calls[-1]  # the last decode step
    big = [(name, moved) for name, moved in ops if moved]
    big += [(name, moved) for name, moved in triton_launches if moved]
    return {
        "path": "triton" if use_triton else "torch",
        "torch_ops": len(ops),
        "triton_launches": len(triton_launches),
        "vocab_sized": len(big),
        "vocab_sized_MB": round(sum(m for _, m in big) / 1e6, 1),
        "vocab_sized_op_names": [n for n, _ in big],
        "op_names": [n for n, _ in ops],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--paths", default="torch,triton", help="which of torch,triton to count")
    ap.add_argument("--list", action="store_true", help="print every torch op")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = _tiny_model(args.vocab, Path(tmp))
        for use_triton in [p == "triton" for p in args.paths.split(",")]:
            r = count(model, args.batch, args.vocab, use_triton)
            if not r:
                continue
            kernels = r["torch_ops"] + r["triton_launches"]
            print(
                f"{r['path']:>6}: {r['torch_ops']} torch ops + {r['triton_launches']} Triton "
                f"launches = {kernels} kernels; {r['vocab_sized']} of them touch a "
                f"[{args.batch}, {args.vocab}] tensor, {r['vocab_sized_MB']} MB in+out"
            )
            print("        vocab-sized:", " ".join(r["vocab_sized_op_names"]))
            if args.list:
                print("        all torch ops:", " ".join(r["op_names"]))


if __name__ == "__main__":
    main()
