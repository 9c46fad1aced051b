"""``ruvdllm adapters train|list|export|import``: a node's TALoRA bank from the shell.

* ``train DOCS --bank DIR``: learn each bank's LoRA on the text files of DOCS
  (starting from the bank's global adapter) and store them as local patterns
  keyed by the text's embedding;
* ``list --bank DIR``: statistics and the patterns' metadata;
* ``export --bank DIR (--id N | --global BANK) OUT``: one adapter in PEFT format;
* ``import --bank DIR PEFT (--global BANK --version V | --pattern BANK --key-text DOCS)``.

A bank folder that does not exist yet is created by ``train`` and ``import --pattern``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ruvdllm.lora import LoRAConfig, export_peft, import_peft
from ruvdllm.quant import SCHEMES
from ruvdllm.talora import BANKS, TALoRA

TEXT_SUFFIXES = (".txt", ".md", ".rst")


def read_texts(folder: str | Path) -> list[str]:
    """Every .txt/.md/.rst file under ``folder`` (sorted), one text per file."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder of documents")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    texts = [p.read_text("utf-8", errors="replace") for p in files]
    if not any(t.strip() for t in texts):
        raise ValueError(f"{root}: no text in {'/'.join(TEXT_SUFFIXES)} files")
    return texts


def _open_bank(path: str, dim: int, lora: LoRAConfig) -> TALoRA:
    """The bank at ``path``, or a new one there; refused before any training if unwritable."""
    from ruvdllm.cli import check_output  # the CLI module imports this one

    check_output(Path(path), folder=True)
    if (Path(path) / "CURRENT").exists():
        bank = TALoRA.load(path)
        if bank.dim != dim or bank.lora != lora:
            raise ValueError(f"{path}: bank has dim {bank.dim} and {bank.lora}, not {dim} and "
                             f"{lora}")
        return bank
    return TALoRA(path, dim, lora)


def _lora_from(args: argparse.Namespace) -> LoRAConfig:
    return LoRAConfig(rank=args.rank, alpha=args.alpha, targets=tuple(args.targets))


def _train(args: argparse.Namespace) -> None:
    from ruvdllm.learn import prompt_embedding, train_bank
    from ruvdllm.runtime import load

    texts = read_texts(args.docs)
    lora = _lora_from(args)
    rt = load(args.model, quant=args.quant, device=args.device)
    bank = _open_bank(args.bank, rt.model.config.d_model, lora)
    key = prompt_embedding(rt.model, rt.tokenizer, texts)
    for name in args.banks:
        t0 = time.time()
        adapter, metrics = train_bank(rt.model, rt.tokenizer, texts, name, lora=lora,
                                      init=bank.global_adapter(name), steps=args.steps,
                                      lr=args.lr, seq_len=args.seq_len,
                                      batch_size=args.batch_size, seed=args.seed)
        meta = {"bank": name, "source": str(Path(args.docs).resolve()),
                "created": time.time(), **metrics}
        pid = bank.store(adapter, key, meta)
        print(f"{name}: pattern {pid}, loss {metrics['loss_before']:.3f} -> "
              f"{metrics['loss_after']:.3f} ({time.time() - t0:.1f}s)", flush=True)
    bank.save()


def _list(args: argparse.Namespace) -> None:
    bank = TALoRA.load(args.bank)
    out: dict[str, Any] = {"stats": bank.stats(),
                           "patterns": {pid: bank.meta(pid) for pid in bank.patterns()}}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(json.dumps(out["stats"]))
    for pid, meta in out["patterns"].items():
        rest = {k: v for k, v in meta.items() if k != "bank"}
        print(f"{pid}\t{meta['bank']}\t{json.dumps(rest)}")


def _export(args: argparse.Namespace) -> None:
    bank = TALoRA.load(args.bank)
    if args.id is not None:
        if args.id not in bank.patterns():
            raise ValueError(f"{args.bank}: no pattern {args.id}")
        adapter = bank.adapter(args.id)
    else:
        found = bank.global_adapter(args.global_bank)
        if found is None:
            raise ValueError(f"{args.bank}: bank {args.global_bank!r} has no global adapter")
        adapter = found
    print(f"wrote {export_peft(adapter, bank.lora, args.out)}")


def _import(args: argparse.Namespace) -> None:
    adapter, lora = import_peft(args.peft)
    if args.global_bank is not None:
        if args.version is None:
            raise ValueError("--global needs --version")
        bank = TALoRA.load(args.bank)
        if bank.lora != lora:
            raise ValueError(f"PEFT adapter is {lora}, the bank holds {bank.lora}")
        bank.set_global(args.global_bank, adapter, args.version)
        print(f"global {args.global_bank} set to version {args.version}")
    else:
        from ruvdllm.learn import prompt_embedding
        from ruvdllm.lora import LoRAModel
        from ruvdllm.runtime import load

        if args.pattern is None or args.key_text is None:
            raise ValueError("import needs --global BANK --version V, or --pattern BANK "
                             "--key-text DOCS")
        rt = load(args.model, device=args.device)
        LoRAModel(rt.model, lora).add("check", adapter)  # refuses shapes that do not fit
        bank = _open_bank(args.bank, rt.model.config.d_model, lora)
        key = prompt_embedding(rt.model, rt.tokenizer, read_texts(args.key_text))
        pid = bank.store(adapter, key, {"bank": args.pattern, "source": str(args.peft)})
        print(f"stored pattern {pid} in {args.pattern}")
    bank.save()


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``adapters`` and its subcommands to the ``ruvdllm`` parser."""
    p = subparsers.add_parser("adapters", help="train, list, export and import TALoRA adapters")
    sub = p.add_subparsers(dest="adapters_command", required=True)

    t = sub.add_parser("train", help="learn local patterns from a folder of text")
    t.add_argument("docs", help="folder of .txt/.md/.rst files")
    t.add_argument("--bank", required=True, help="TALoRA bank folder (created if missing)")
    t.add_argument("--banks", nargs="+", choices=BANKS, default=list(BANKS))
    t.add_argument("--model", default="default")
    t.add_argument("--quant", default="int8", choices=["none", *SCHEMES])
    t.add_argument("--device", default=None)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--targets", nargs="+", default=list(LoRAConfig().targets))
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_train)

    ls = sub.add_parser("list", help="bank statistics and patterns")
    ls.add_argument("--bank", required=True)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

    e = sub.add_parser("export", help="write one adapter in PEFT format")
    e.add_argument("out")
    e.add_argument("--bank", required=True)
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, help="a local pattern")
    which.add_argument("--global", dest="global_bank", choices=BANKS, help="a global slot")
    e.set_defaults(func=_export)

    i = sub.add_parser("import", help="add a PEFT adapter as a global slot or local pattern")
    i.add_argument("peft", help="folder with adapter_config.json + adapter_model.safetensors")
    i.add_argument("--bank", required=True)
    i.add_argument("--global", dest="global_bank", choices=BANKS)
    i.add_argument("--version", type=int)
    i.add_argument("--pattern", choices=BANKS, help="store as a local pattern of this bank")
    i.add_argument("--key-text", help="folder of text whose embedding keys the pattern")
    i.add_argument("--model", default="default")
    i.add_argument("--device", default=None)
    i.set_defaults(func=_import)
