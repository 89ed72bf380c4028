"""`graphwise generate PROMPT`: load a model, answer one prompt, print the text."""

from __future__ import annotations

import argparse
import sys

from graphwise.config import add_engine_args, engine_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt (a user message unless --raw)")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    add_engine_args(parser)


def run(args: argparse.Namespace) -> int:
    from graphwise.llm import LLM
    from graphwise.sampling_params import SamplingParams
    from graphwise.tokenizer import apply_chat_template

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    config = engine_config_from_args(args, max_num_seqs=min(args.max_num_seqs, 8))
    llm = LLM.from_config(config)
    tokenizer = llm.get_tokenizer()
    use_template = not args.raw and getattr(tokenizer, "chat_template", None) is not None
    if use_template:
        ids = apply_chat_template(tokenizer, [{"role": "user", "content": args.prompt}])
        out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)
    sys.stdout.write(out[0].outputs[0].text.strip() + "\n")
    return 0
