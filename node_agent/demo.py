"""``ruvdllm demo``: a coordinator and N nodes on 127.0.0.1, a few federated rounds, a report.

Each node gets a different local domain from the corpora (by default ``pydocs`` and
``kerneldocs``, which base training never saw, and ``shakespeare``): its data folder is
filled from the domain's train split. The demo then runs R rounds and prints, as each
round closes, its outcome, participants, rejections and bytes uploaded per node; then the
held-out perplexity of every node's domain (test split) under the first (no-op) and the
last merged version; then a completion from one node through its OpenAI-compatible API.
Every process it started is stopped by PID on the way out — also on Ctrl-C or an error —
and the work folder is removed unless ``--keep`` or ``--workdir`` is given. Run again on a
kept ``--workdir``, the demo resumes the federation persisted there (round numbers and
versions continue) and reports only the new run's rounds.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from federation import load_public_key
from node_agent.loopback import FederationError, LoopbackFederation, NodeSpec, Settings
from proto import ruvdllm_pb2 as pb
from ruvdllm.corpus import documents

DEFAULT_DOMAINS = ("pydocs", "kerneldocs", "shakespeare", "bible", "wiki")
DOC_CHARS = 4000  # characters taken from each document (many topics, bounded cost)


def local_texts(domain: str, chars: int) -> list[str]:
    """About ``chars`` characters of a domain's train split, in pieces of ≤ DOC_CHARS."""
    out: list[str] = []
    total = 0
    for doc in documents(domain, "train"):
        out.append(doc[:DOC_CHARS])
        total += len(out[-1])
        if total >= chars:
            break
    return out


def pick_domains(wanted: list[str], n: int) -> list[str]:
    """``n`` domains from ``wanted`` (cycled), skipping any whose corpus is not installed."""
    usable: list[str] = []
    for domain in wanted:
        if len(usable) == n:
            break
        try:
            documents(domain, "test")
            usable.append(domain)
        except FileNotFoundError as err:
            print(f"  (skipping {domain}: {err})")
    if not usable:
        raise FileNotFoundError("none of the corpus domains is installed; see docs/corpora.md")
    return [usable[i % len(usable)] for i in range(n)]


def _print_round(fed: LoopbackFederation, round_number: int) -> None:
    row = next(r for r in fed.rounds() if r.round == round_number)
    took = (row.finished_unix or time.time()) - row.started_unix
    outcome = f"merged -> version {row.version}" if row.status == "merged" else row.status
    print(f"\nround {row.round}: {outcome} ({row.accepted or 0}/{row.sampled} accepted, "
          f"{took:.1f} s{'; ' + row.note if row.note else ''})")
    for p in fed.participants(round_number):
        timing = (f"train {p.train_s:.1f} s, upload {p.upload_s:.2f} s"
                  if p.train_s is not None and p.upload_s is not None else "")
        kept = "" if p.contributed else "  [excluded by DAF]"
        print(f"  {p.node_id:<16} {p.size_bytes:>8,} bytes  {p.num_examples:>5} examples  "
              f"{timing}{kept}")
    for r in fed.rejections(round_number):
        print(f"  REJECTED {r.node_id}: {r.reason} ({r.stage}) {r.detail[:100]}")


def run_demo(nodes: int, rounds: int, local_steps: int, chars: int, domains: list[str],
             byzantine: str, workdir: Path) -> None:
    """The whole demo in ``workdir``; raises on failure (the caller reports it)."""
    print(f"ruvdllm demo: a coordinator and {nodes} nodes on 127.0.0.1, {rounds} rounds "
          f"(work folder {workdir})")
    chosen = pick_domains(domains, nodes)
    specs = []
    for i, domain in enumerate(chosen):
        bad = byzantine if byzantine and i == nodes - 1 else ""
        specs.append(NodeSpec(f"node{i}-{domain}", local_texts(domain, chars), byzantine=bad))
        print(f"  node{i}-{domain}: {sum(map(len, specs[-1].texts)):,} characters of local "
              f"{domain} text{' (BYZANTINE: ' + bad + ')' if bad else ''}")
    honest = nodes - (1 if byzantine else 0)
    # Multi-Krum, the coordinator's default for the coarse bank, needs >= 3 updates.
    settings = Settings(rounds=rounds, local_steps=local_steps, quorum=2,
                        rules={} if honest >= 3 else {"coarse": "trimmed_mean"})
    t0 = time.time()
    with LoopbackFederation(workdir, specs, settings) as fed:
        assert fed.deployment is not None
        print(f"up in {time.time() - t0:.0f} s: SuperLink pid {fed.deployment.superlink_pid}, "
              f"nodes " + ", ".join(f"{n.spec.name} pid {n.process.pid}" for n in fed.nodes))
        from coordinator.launch import submit_run

        # A kept work folder resumes its federation: its rounds so far are not this run's.
        before = max((r.round for r in fed.rounds()), default=0)
        if before:
            print(f"resuming the federation in {workdir}: {before} rounds so far, version "
                  f"{fed.latest_version()}")
        fed.deployment.run_id = submit_run(fed.coordinator_cfg, fed.deployment.flwr_home)
        printed = 0
        end = time.monotonic() + rounds * (settings.round_timeout + 60)
        status = "running"
        while time.monotonic() < end:
            done = [r.round for r in fed.rounds() if r.status != "open" and r.round > before]
            for number in done[printed:]:
                _print_round(fed, number)
            printed = len(done)
            if printed >= rounds:
                break
            if (status := fed.deployment.status()).startswith("finished:"):
                break
            time.sleep(2.0)
        latest = fed.latest_version()
        print(f"\nfederation: Flower run {status if printed < rounds else 'done'}, latest "
              f"version {latest}")
        fed.wait_for_version(latest)
        print("every node serves version", latest)
        _report_perplexity(chosen, fed.deployment.store.load_adapter(1),
                           fed.deployment.store.load_adapter(latest),
                           fed.state_dir / "coordinator.pub")
        node = fed.nodes[0]
        prompt = "In Python, a list is"
        reply = httpx.post(f"{node.cfg.http_url}/v1/completions", timeout=120.0,
                           json={"prompt": prompt, "max_tokens": 32, "steps": 32}).json()
        print(f"\ncompletion from {node.spec.name} (POST {node.cfg.http_url}/v1/completions, "
              f"{reply.get('system_fingerprint')}):\n  {prompt}{reply['choices'][0]['text']}")
        print("\nstopping every process by PID ...")
    print("all processes stopped")


def _report_perplexity(domains: list[str], first: pb.MergedAdapter, last: pb.MergedAdapter,
                       coordinator_pub: Path) -> None:
    from node_agent.heldout import HeldoutScorer
    from ruvdllm.lora import LoRAConfig
    from ruvdllm.runtime import load

    rt = load("default", quant="int8", device="cpu")
    scorer = HeldoutScorer(rt.model, rt.tokenizer, LoRAConfig(),
                           load_public_key(coordinator_pub))
    print("\nheld-out perplexity (test split, ELBO bound, TALoRA mix per t):")
    print(f"  {'domain':<12} {'v' + str(first.version):>10} {'v' + str(last.version):>10}")
    for domain in dict.fromkeys(domains):
        texts = documents(domain, "test")
        scores = []
        for message in (first, last):
            scorer.use(message)
            scores.append(scorer.perplexity(texts))
        print(f"  {domain:<12} {scores[0]:>10.2f} {scores[1]:>10.2f}")


def _run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.nodes < 2 or args.rounds < 1:
        raise ValueError("the demo needs --nodes >= 2 and --rounds >= 1")
    if args.local_steps < 1 or args.chars < 1:
        raise ValueError("--local-steps and --chars must be >= 1")
    keep = args.keep or args.workdir is not None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ruvdllm-demo-")).resolve()
    t0 = time.time()
    try:
        run_demo(args.nodes, args.rounds, args.local_steps, args.chars, args.domains,
                 args.byzantine, workdir)
    except (FederationError, RuntimeError) as err:
        print(f"ruvdllm demo: failed: {err} (logs under {workdir})", file=sys.stderr)
        keep = True
        sys.exit(1)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ndemo finished in {time.time() - t0:.0f} s"
          + (f"; work folder kept: {workdir}" if keep else ""))


def build_parser() -> argparse.ArgumentParser:
    """The demo's options (``ruvdllm demo ...`` hands its arguments to :func:`main`)."""
    p = argparse.ArgumentParser(prog="ruvdllm demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=4, help="training steps per bank")
    p.add_argument("--chars", type=int, default=20_000, help="local text per node")
    p.add_argument("--domains", nargs="+", default=list(DEFAULT_DOMAINS),
                   help="corpus domains, one per node in order (cycled)")
    p.add_argument("--byzantine", default="", choices=["", "signflip", "scale:100"],
                   help="make the last node misbehave (a robust-aggregation showcase)")
    p.add_argument("--workdir", default=None, help="keep everything in this folder")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``ruvdllm demo`` (and ``python -m node_agent.demo``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _run(args)
    except (ValueError, OSError) as err:  # user errors: one line, exit 2
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
