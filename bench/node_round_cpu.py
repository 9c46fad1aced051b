"""CPU seconds of one node round's local training, as ``node_agent.trainer`` runs it.

One round trains every TALoRA bank with :func:`ruvdllm.learn.train_bank` on the node's local
text (here ``pydocs`` from the corpora, as the demo gives a node), with the round settings of
bench.toml's ``[federation]`` (1 step per bank on 1 × 64 tokens at lr 0.01) on the default
model quantized to int8, as ``ruvdllm-node`` loads it. Printed: the median over ``--rounds``
of the process CPU seconds (all threads) and wall seconds per round, after one warm-up round,
and the wall time of one ``prompt_embedding`` of a short prompt (what the HTTP engine does per
request).

``--eval node`` scores the banks as the node does (``trainer.eval_batches``); ``--eval
default`` passes nothing, so ``train_bank`` scores ``EVAL_BATCHES`` batches on every bank,
which is what rounds did before the node scored only the gain bank. The figure from before
that change is had by running this file in an export of the earlier commit::

    python -m bench.node_round_cpu --eval node            # this tree
    git archive cce51b9 | tar -x -C /tmp/before && cp bench/node_round_cpu.py /tmp/before/bench/ \
        && (cd /tmp/before && python -m bench.node_round_cpu --eval default)
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from node_agent.demo import local_texts
from ruvdllm.learn import prompt_embedding, train_bank
from ruvdllm.lora import LoRAConfig
from ruvdllm.runtime import load
from ruvdllm.talora import BANKS


def main() -> None:
    """Parse the options, run the rounds, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval", choices=("node", "default"), default="node")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chars", type=int, default=20_000, help="characters of local text")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 keeps OpenMP spin-waits on a loaded machine out "
                             "of the CPU figure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rt = load("default", quant="int8", device="cpu")
    texts = local_texts("pydocs", args.chars)
    lora = LoRAConfig(rank=8, alpha=16.0)

    def one_round(number: int) -> None:
        for i, bank in enumerate(BANKS):
            kw: dict[str, Any] = {}
            if args.eval == "node":
                from node_agent.trainer import eval_batches  # absent before the change
                kw["eval_batches"] = eval_batches(bank)
            train_bank(rt.model, rt.tokenizer, texts, bank, lora=lora, ffa_seed=7, steps=1,
                       lr=0.01, seq_len=64, batch_size=1, seed=1000 * number + i, **kw)

    one_round(0)
    cpu, wall = [], []
    for number in range(1, args.rounds + 1):
        c0, w0 = time.process_time(), time.perf_counter()
        one_round(number)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    prompt_embedding(rt.model, rt.tokenizer, ["def add(a, b):"])
    w0 = time.perf_counter()
    prompt_embedding(rt.model, rt.tokenizer, ["def add(a, b):"])
    embed = time.perf_counter() - w0
    print(f"eval={args.eval} threads={torch.get_num_threads()} rounds={args.rounds}: "
          f"cpu {statistics.median(cpu):.2f} s/round (each {' '.join(f'{c:.2f}' for c in cpu)}), "
          f"wall {statistics.median(wall):.2f} s/round, prompt_embedding {embed:.3f} s")


if __name__ == "__main__":
    main()
