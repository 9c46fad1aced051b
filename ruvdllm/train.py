"""Pre-training: the masked-diffusion objective and, for the AR twin, next-token loss.

Masked diffusion (LLaDA, Nie et al. 2025; MDLM, Sahoo et al. 2024): draw
``t ~ U(eps, 1)`` per sequence, replace each token by ``[MASK]`` with
probability ``t``, and minimise

    L = E_t [ 1/t * sum_{i masked} -log p(x_i | x_t) ] / L_seq,

an upper bound on the per-token negative log-likelihood. With
``prefix_fraction > 0`` that share of sequences keeps a random-length prefix
unmasked (the prompt/answer split of LLaDA's SFT), so the model also learns to
continue a clean prompt, which is how it is used. The AR twin is the same
network with ``config.causal`` and the next-token loss, trained on the same
token stream with the same budget.

Data is the packed token stream of a corpus export (documents joined by EOS);
a step draws random windows of ``seq_len`` tokens. Runs are resumable (device
commands last at most 10 minutes): the newest state is saved to
``OUT/state.pt`` every ``save_every`` seconds and at the time budget, and the
checkpoint with the lowest validation loss is written to ``OUT/best``. With
``init`` a run starts from a checkpoint's weights instead of a random
network (continued pre-training with a new schedule, e.g. with dropout).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ruvdllm.config import ModelConfig
from ruvdllm.model import DiffusionLM
from ruvdllm.tokenizer import Tokenizer

CALIBRATE = (20, 120)  # steps between which speed is measured when max_steps is 0


@dataclass
class TrainConfig:
    data: str = "data/corpus"
    domains: tuple[str, ...] = ("wiki", "shakespeare", "bible")
    out: str = "runs/default"
    objective: str = "diffusion"  # or "ar"
    seq_len: int = 256
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 500
    max_steps: int = 0  # 0: fit the time budget (measured after CALIBRATE steps)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eps: float = 1e-3
    prefix_fraction: float = 0.3
    eval_every: int = 500
    eval_batches: int = 16
    save_every: float = 120.0
    time_budget: float = 540.0
    seed: int = 0
    compile: bool = True
    model: dict[str, Any] = field(default_factory=dict)
    init: str = ""  # checkpoint folder (or shipped name) to start from; "" = random weights

    def __post_init__(self) -> None:
        """Refuse settings no run can use, before any file is written."""
        if self.objective not in ("diffusion", "ar"):
            raise ValueError(f"unknown objective {self.objective!r} (diffusion or ar)")
        positive = {"batch_size": self.batch_size, "eval_every": self.eval_every,
                    "eval_batches": self.eval_batches, "grad_clip": self.grad_clip,
                    "save_every": self.save_every, "time_budget": self.time_budget}
        non_negative = {"lr": self.lr, "min_lr": self.min_lr, "warmup": self.warmup,
                        "max_steps": self.max_steps, "weight_decay": self.weight_decay}
        bad = [f"{k} must be positive, got {v}" for k, v in positive.items() if not v > 0]
        bad += [f"{k} must be >= 0, got {v}" for k, v in non_negative.items() if not v >= 0]
        if self.seq_len < 2:
            bad.append(f"seq_len must be at least 2 tokens, got {self.seq_len}")
        if not 0 < self.eps < 1:
            bad.append(f"eps must be in (0, 1), got {self.eps}")
        if not 0 <= self.prefix_fraction <= 1:
            bad.append(f"prefix_fraction must be in [0, 1], got {self.prefix_fraction}")
        if bad:
            raise ValueError("; ".join(bad))


def token_stream(texts: list[str], tok: Tokenizer) -> Tensor:
    """Documents as ``BOS doc EOS`` joined into one 1-D int tensor.

    Prompts at inference start with BOS too, so "continue a document" is the
    situation the model was trained on.
    """
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_bos=True):
        ids.extend(enc)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


def batch_windows(stream: Tensor, batch: int, seq_len: int, gen: torch.Generator) -> Tensor:
    """``(batch, seq_len)`` random windows of the stream."""
    starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=gen,
                           device=stream.device)
    idx = starts[:, None] + torch.arange(seq_len, device=stream.device)  # (B, L)
    return stream[idx].long()


def diffusion_loss(
    model: DiffusionLM, x0: Tensor, eps: float, prefix_fraction: float,
    gen: torch.Generator | None = None, t: Tensor | None = None,
) -> Tensor:
    """Masked-diffusion ELBO loss per token (mean over the batch), see module docstring."""
    B, L = x0.shape
    dev = x0.device
    if t is None:
        t = eps + (1 - eps) * torch.rand(B, device=dev, generator=gen)
    masked = torch.rand(B, L, device=dev, generator=gen) < t[:, None]
    if prefix_fraction > 0:
        plen = (torch.rand(B, device=dev, generator=gen) * L / 2).long()
        has_prefix = torch.rand(B, device=dev, generator=gen) < prefix_fraction
        plen = torch.where(has_prefix, plen, 0)
        masked &= torch.arange(L, device=dev)[None] >= plen[:, None]
    xt = torch.where(masked, model.config.mask_token_id, x0)
    logits = model(xt).logits
    nll = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # (B, L)
    return (nll * masked / t[:, None]).sum() / (B * L)


def ar_loss(model: DiffusionLM, x0: Tensor) -> Tensor:
    """Next-token cross-entropy per token for the causal twin."""
    logits = model(x0[:, :-1]).logits
    return F.cross_entropy(logits.float().transpose(1, 2), x0[:, 1:])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def loss_fn(model: DiffusionLM, x0: Tensor, cfg: TrainConfig, gen: torch.Generator,
            t: Tensor | None = None) -> Tensor:
    if cfg.objective == "ar":
        return ar_loss(model, x0)
    return diffusion_loss(model, x0, cfg.eps, cfg.prefix_fraction, gen, t)


@torch.no_grad()
def validate(model: DiffusionLM, stream: Tensor, cfg: TrainConfig, amp: bool) -> float:
    """Validation loss with a fixed seed and stratified t (low-variance, comparable)."""
    model.eval()
    gen = torch.Generator(device=stream.device).manual_seed(1234)
    total = 0.0
    for i in range(cfg.eval_batches):
        x0 = batch_windows(stream, cfg.batch_size, cfg.seq_len, gen)
        n = x0.shape[0]
        t = cfg.eps + (1 - cfg.eps) * (torch.arange(n, device=x0.device) + (i + 0.5) /
                                       cfg.eval_batches) / n
        with torch.autocast(stream.device.type, torch.bfloat16, enabled=amp):
            total += float(loss_fn(model, x0, cfg, gen, t=t))
    model.train()
    return total / cfg.eval_batches


def initial_weights(cfg: TrainConfig, tok: Tokenizer) -> DiffusionLM | None:
    """The float32 network named by ``cfg.init``, checked against the run, or None."""
    if not cfg.init:
        return None
    from ruvdllm.checkpoint import load_model

    base = load_model(cfg.init, dtype=torch.float32)
    bc = base.config
    if bc.quantization:
        raise ValueError(f"init {cfg.init}: a quantized checkpoint cannot be trained further; "
                         "start from its float weights")
    if (bc.vocab_size, bc.mask_token_id) != (tok.vocab_size, tok.mask_token_id):
        raise ValueError(f"init {cfg.init}: vocabulary {bc.vocab_size} (mask {bc.mask_token_id})"
                         f" does not match the tokenizer's {tok.vocab_size} "
                         f"(mask {tok.mask_token_id})")
    if bc.causal != (cfg.objective == "ar"):
        raise ValueError(f"init {cfg.init}: a {'causal' if bc.causal else 'bidirectional'} "
                         f"model cannot be trained with the {cfg.objective} objective")
    return base


def train(cfg: TrainConfig, tokenizer_file: str | Path) -> Path:
    """Train (or resume) and return the folder of the best checkpoint."""
    from tqdm import tqdm

    from ruvdllm.checkpoint import save_checkpoint
    from ruvdllm.corpus import read_export
    tok = Tokenizer(tokenizer_file)
    init = initial_weights(cfg, tok)
    out = Path(cfg.out)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = dev.type == "cuda"
    torch.manual_seed(cfg.seed)

    def split_stream(split: str) -> Tensor:
        docs = [d for dom in cfg.domains for d in read_export(cfg.data, dom, split)]
        return token_stream(docs, tok).to(dev)

    train_ids, valid_ids = split_stream("train"), split_stream("valid")
    for split, ids in (("train", train_ids), ("valid", valid_ids)):
        if len(ids) <= cfg.seq_len:
            raise ValueError(f"the {split} split has {len(ids)} tokens; a window of seq_len "
                             f"{cfg.seq_len} needs more")
    mcfg = ModelConfig.from_dict({
        **ModelConfig().to_dict(),
        "vocab_size": tok.vocab_size, "embedding_size": tok.vocab_size,
        "mask_token_id": tok.mask_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
        "max_sequence_length": max(512, cfg.seq_len), "causal": cfg.objective == "ar",
        **(init.config.to_dict() if init is not None else {}),
        **cfg.model,
    })
    if cfg.seq_len > mcfg.max_sequence_length:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_sequence_length "
                         f"{mcfg.max_sequence_length}")
    model = DiffusionLM(mcfg).to(dev)
    if init is not None:
        try:
            model.load_state_dict(init.state_dict())
        except RuntimeError:
            raise ValueError(f"init {cfg.init}: --model-json changes the network's shape; only "
                             "settings such as dropout can differ from the checkpoint") from None
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    step, best = 0, math.inf
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    state_file = out / "state.pt"
    if state_file.exists():
        state = torch.load(state_file, map_location=dev, weights_only=False)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:
            raise ValueError(f"{state_file} is a run of a model of another shape; resume with its "
                             "--model-json/--init, or train into a new --out") from None
        opt.load_state_dict(state["opt"])
        step, best = state["step"], state["best"]
        cfg.max_steps = cfg.max_steps or state["max_steps"]
        gen.manual_seed(cfg.seed + step)
    out.mkdir(parents=True, exist_ok=True)
    fwd = torch.compile(model) if cfg.compile and dev.type == "cuda" else model
    log = open(out / "loss.csv", "a", newline="")  # noqa: SIM115 — kept open for the run
    writer = csv.writer(log)
    if step == 0:
        writer.writerow(["step", "train_loss", "valid_loss", "lr", "seconds"])
    print(f"model {model.num_parameters() / 1e6:.1f} M params, train {len(train_ids):,} tokens, "
          f"valid {len(valid_ids):,}, {cfg.objective}, resume at step {step}", flush=True)

    def save_state() -> None:
        tmp = state_file.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "max_steps": cfg.max_steps, "best": best, "train_config": asdict(cfg)}, tmp)
        tmp.replace(state_file)

    t0 = last_save = time.time()
    bar = tqdm(total=cfg.max_steps or None, initial=step, mininterval=10)
    running = 0.0
    model.train()
    t_cal = t0
    while (cfg.max_steps <= 0 or step < cfg.max_steps) and time.time() - t0 < cfg.time_budget:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x0 = batch_windows(train_ids, cfg.batch_size, cfg.seq_len, gen)
        with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
            loss = loss_fn(fwd, x0, cfg, gen)  # type: ignore[arg-type]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        if step == CALIBRATE[0]:
            t_cal = time.time()
        if cfg.max_steps <= 0 and step == CALIBRATE[1]:
            rate = (CALIBRATE[1] - CALIBRATE[0]) / (time.time() - t_cal)
            cfg.max_steps = step + int(0.95 * rate * (cfg.time_budget - (time.time() - t0)))
            bar.total = cfg.max_steps
            print(f"{rate:.1f} steps/s: max_steps set to {cfg.max_steps}", flush=True)
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            vl = validate(model, valid_ids, cfg, amp)
            writer.writerow([step, f"{running:.4f}", f"{vl:.4f}", f"{lr_at(step, cfg):.2e}",
                             f"{time.time() - t0:.0f}"])
            log.flush()
            bar.set_postfix(train=f"{running:.3f}", valid=f"{vl:.3f}")
            if vl < best:
                best = vl
                save_checkpoint(model, out / "best", tokenizer_file)
        if time.time() - last_save > cfg.save_every:
            save_state()
            last_save = time.time()
    bar.close()
    save_state()
    log.close()
    print(f"stopped at step {step}, best valid loss {best:.4f} "
          f"(ppl bound {math.exp(best):.1f})", flush=True)
    return out / "best"


LOSS_COLUMNS = ("step", "train_loss", "valid_loss")


def read_loss_csv(path: str | Path) -> tuple[list[int], list[float], list[float]]:
    """Steps, train and validation losses of a run's ``loss.csv``; ValueError if it is not one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file") from None
    rows = list(csv.DictReader(text.splitlines()))
    missing = [c for c in LOSS_COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: not a loss.csv of a training run (needs a header with "
                         f"{', '.join(LOSS_COLUMNS)} and at least one row)")
    try:
        return ([int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows],
                [float(r["valid_loss"]) for r in rows])
    except (TypeError, ValueError):
        raise ValueError(f"{path}: a row has a missing or non-numeric step or loss") from None


def plot_loss(csv_files: list[str | Path], out: str | Path) -> None:
    """Train and validation loss against step for one or more ``loss.csv`` files.

    Each curve is named for its run folder (every run writes ``loss.csv``). All files are
    read before anything is drawn, so a bad one leaves ``out`` untouched.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(out).suffix.lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise ValueError(f"{out}: the plot's file name must end in one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    runs = [(Path(p).parent.name if Path(p).stem == "loss" else Path(p).stem, read_loss_csv(p))
            for p in csv_files]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (steps, train_loss, valid_loss) in runs:
        ax.plot(steps, train_loss, "--", label=f"{label} train")
        ax.plot(steps, valid_loss, label=f"{label} valid")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token; diffusion: ELBO bound)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
