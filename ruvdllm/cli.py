"""``ruvdllm``: generate, quantize, train and evaluate from the command line.

User errors (a missing model folder, a corrupt checkpoint, options that do not
fit together) end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ruvdllm import adapters_cli
from ruvdllm.checkpoint import CheckpointError
from ruvdllm.config import ConfigError
from ruvdllm.quant import DEFAULT_GROUP_SIZE, SCHEMES
from ruvdllm.sampler import SamplerError

USER_ERRORS = (CheckpointError, ConfigError, SamplerError, OSError, ValueError)  # OSError: paths


def check_output(path: Path | None, folder: bool = False) -> None:
    """Refuse an output path that could not be written, before a long run computes it.

    Missing folders on the way are allowed (the writer makes them); a file where a folder
    is needed, or the reverse, or a place this user cannot write, is a ValueError.
    """
    if path is None:
        return
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{path}: exists and is {'not ' if folder else ''}a folder")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot create it under {parent}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{path}: not writable")


def _generate(args: argparse.Namespace) -> None:
    from ruvdllm.runtime import load

    rt = load(args.model, quant=args.quant, group_size=args.group_size, device=args.device,
              fast=args.fast)
    options = dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                   threshold=args.threshold, temperature=args.temperature, seed=args.seed,
                   repetition_penalty=args.repetition_penalty,
                   cache=args.cache, remasking=args.remasking, early_stop=args.early_stop,
                   suffix=args.suffix)
    if args.stream:
        for piece in rt.stream(args.prompt, chat=args.chat, **options):
            print(piece, end="", flush=True)
        print()
    else:
        print(rt.generate(args.prompt, chat=args.chat, **options))


def _quantize(args: argparse.Namespace) -> None:
    from ruvdllm.quant import quantize_checkpoint

    out = quantize_checkpoint(args.src, args.dst, args.scheme, args.group_size)
    print(f"wrote {out}")


def _train(args: argparse.Namespace) -> None:
    from ruvdllm.train import TrainConfig, train

    model = json.loads(args.model_json) if args.model_json else {}
    cfg = TrainConfig(data=args.data, out=args.out, objective=args.objective,
                      domains=tuple(args.domains), seq_len=args.seq_len,
                      batch_size=args.batch_size, lr=args.lr, max_steps=args.max_steps,
                      warmup=args.warmup, time_budget=args.time_budget,
                      eval_every=args.eval_every, prefix_fraction=args.prefix_fraction,
                      weight_decay=args.weight_decay, compile=not args.no_compile,
                      seed=args.seed, model=model, init=args.init)
    print(f"best checkpoint: {train(cfg, args.tokenizer)}")


def _plot_loss(args: argparse.Namespace) -> None:
    from ruvdllm.train import plot_loss

    check_output(Path(args.out))
    plot_loss(args.csv, args.out)
    print(f"wrote {args.out}")


def _eval(args: argparse.Namespace) -> None:
    from ruvdllm.corpus import documents, read_export
    from ruvdllm.evaluate import perplexity
    from ruvdllm.runtime import load
    from ruvdllm.train import token_stream

    check_output(args.json)
    rt = load(args.model, quant=args.quant, group_size=args.group_size, device=args.device)
    rows = []
    for domain in args.domains:
        docs = read_export(args.data, domain, args.split) if args.data else documents(
            domain, args.split)
        t0 = time.time()
        ppl = perplexity(rt.model, token_stream(docs, rt.tokenizer), args.seq_len, args.max_tokens,
                         args.samples)
        rows.append({"domain": domain, "split": args.split, "model": str(args.model),
                     "quant": args.quant, "ppl": round(ppl, 3),
                     "kind": "exact" if rt.model.config.causal else "elbo-bound",
                     "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def _sample_quality(args: argparse.Namespace) -> None:
    from ruvdllm.corpus import documents, read_export
    from ruvdllm.evaluate import continuation_nll, distinct_n, token_f1
    from ruvdllm.runtime import load

    if args.prompts < 1 or args.prompt_tokens < 1:
        raise ValueError("--prompts and --prompt-tokens must be at least 1")
    rt = load(args.model, device=args.device)
    scorer = load(args.scorer, device=args.device).model
    tok = rt.tokenizer
    texts = read_export(args.data, args.domain, "test") if args.data else documents(
        args.domain, "test")
    docs = [tok.encode(d, add_bos=True) for d in texts]
    docs = [d for d in docs if len(d) >= args.prompt_tokens + args.gen_length][: args.prompts]
    if not docs:
        raise ValueError(f"no {args.domain} test document has the {args.prompt_tokens} + "
                         f"{args.gen_length} tokens a prompt and its continuation need")
    prompts = [d[: args.prompt_tokens] for d in docs]
    truths = [d[args.prompt_tokens: args.prompt_tokens + args.gen_length] for d in docs]
    for penalty in args.penalties:
        cfg = rt.sampler_config(steps=args.steps, gen_length=args.gen_length,
                                block_length=args.block_length, repetition_penalty=penalty)
        answers = rt.generate_ids(prompts, cfg)
        row = {"domain": args.domain, "repetition_penalty": penalty, "prompts": len(prompts),
               "distinct3": round(sum(map(distinct_n, answers)) / len(answers), 4),
               "token_f1": round(sum(map(token_f1, answers, truths)) / len(answers), 4),
               "ar_nll": round(continuation_nll(scorer, prompts, answers), 4),
               "mean_tokens": round(sum(map(len, answers)) / len(answers), 1)}
        print(json.dumps(row), flush=True)


def _demo(args: argparse.Namespace) -> None:
    from node_agent.demo import main as demo_main  # the node layer, loaded only for the demo

    demo_main(args.demo_args)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="checkpoint folder, default or default-ar")
    p.add_argument("--quant", default="none", choices=["none", *SCHEMES])
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help="int4 group size (32/64/128)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ruvdllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt")
    g.add_argument("prompt")
    _model_args(g)
    g.add_argument("--steps", type=int, default=64)
    g.add_argument("--gen-length", type=int, default=64)
    g.add_argument("--block-length", type=int, default=32)
    g.add_argument("--threshold", type=float, default=None,
                   help="commit every position above this confidence (fast path)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.2,
                   help="CTRL-style penalty on tokens already present (1 = off; 1.2 measured "
                   "best, docs/model_card.md)")
    g.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"])
    g.add_argument("--cache", default="none", choices=["none", "prefix", "dual", "delayed"])
    g.add_argument("--early-stop", action="store_true", help="stop once EOS is settled")
    g.add_argument("--suffix", type=int, default=None,
                   help="masked positions after the block that a step sees (DPad's suffix "
                   "dropout; default: all)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stream", action="store_true", help="print text as it is committed")
    g.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="the GPU fast path (caches, device-side commits, CUDA graphs); default: "
                   "on CUDA when the options allow it (greedy, --repetition-penalty 1, "
                   "low-confidence remasking); --stream always runs the reference sampler")
    g.set_defaults(func=_generate)

    q = sub.add_parser("quantize", help="write a quantized checkpoint (int8/int4 weight-only, "
                                        "fp8 W8A8)")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--scheme", required=True, choices=SCHEMES)
    q.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE)
    q.set_defaults(func=_quantize)

    t = sub.add_parser("train", help="pre-train a diffusion model or its AR twin")
    t.add_argument("--data", default="data/corpus", help="folder from `python -m ruvdllm.corpus "
                   "export`")
    t.add_argument("--tokenizer", default=str(Path(__file__).parent / "assets" /
                                              "tokenizer.json"))
    t.add_argument("--out", default="runs/default")
    t.add_argument("--objective", default="diffusion", choices=["diffusion", "ar"])
    t.add_argument("--domains", nargs="+", default=["wiki", "shakespeare", "bible"])
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--max-steps", type=int, default=0, help="0: as many as fit the time budget")
    t.add_argument("--warmup", type=int, default=500)
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--prefix-fraction", type=float, default=0.3)
    t.add_argument("--time-budget", type=float, default=540.0, help="seconds before saving and "
                   "stopping (resume by running again)")
    t.add_argument("--model-json", default="", help='model config overrides, e.g. '
                   '\'{"d_model": 384, "n_layers": 8}\'')
    t.add_argument("--init", default="", help="start from this checkpoint's weights (a folder "
                   "or default); config overrides from --model-json still apply")
    t.add_argument("--no-compile", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_train)

    pl = sub.add_parser("plot-loss", help="plot loss.csv files of training runs")
    pl.add_argument("csv", nargs="+", help="loss.csv files; each curve is named for its run folder")
    pl.add_argument("--out", required=True, help="image file (.png, .svg, .pdf, ...)")
    pl.set_defaults(func=_plot_loss)

    e = sub.add_parser("eval", help="held-out perplexity per domain")
    _model_args(e)
    e.add_argument("--domains", nargs="+", default=["wiki", "shakespeare", "bible", "pydocs"])
    e.add_argument("--split", default="test", choices=["train", "valid", "test"])
    e.add_argument("--data", default=None, help="read an export folder instead of the packages")
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--max-tokens", type=int, default=None, help="cap tokens per domain")
    e.add_argument("--samples", type=int, default=8, help="t samples per window (ELBO)")
    e.add_argument("--json", type=Path, default=None, help="write the rows to this file")
    e.set_defaults(func=_eval)

    s = sub.add_parser("sample-quality", help="repetition and quality of greedy continuations "
                       "of held-out documents, per repetition penalty")
    s.add_argument("--model", default="default")
    s.add_argument("--scorer", default="default-ar", help="causal model scoring fluency")
    s.add_argument("--device", default=None)
    s.add_argument("--domain", default="wiki")
    s.add_argument("--data", default=None, help="read an export folder instead of the packages")
    s.add_argument("--prompts", type=int, default=16)
    s.add_argument("--prompt-tokens", type=int, default=32)
    s.add_argument("--gen-length", type=int, default=64)
    s.add_argument("--block-length", type=int, default=32)
    s.add_argument("--steps", type=int, default=64)
    s.add_argument("--penalties", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.3])
    s.set_defaults(func=_sample_quality)
    d = sub.add_parser("demo", help="coordinator + nodes on loopback, a few federated rounds",
                       add_help=False, prefix_chars="+")
    d.add_argument("demo_args", nargs="*", help="demo options; see `ruvdllm demo --help`")
    d.set_defaults(func=_demo)
    adapters_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except USER_ERRORS as err:
        print(f"ruvdllm: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
