"""One federated round on a node: local training per bank, signed compressed delta, upload.

``TrainRound`` (DESIGN §5): make sure the announced base version is held and verified,
train each TALoRA bank's adapter on the node's local text with ``learn.train_bank``,
starting from that bank's global adapter with the announced FFA seed (A frozen, B
trained), take ``delta = trained B − global B``, clip the whole delta to the coordinator's
L2 bound, encode it with ``federation.encode_delta`` (top-k + int8, error feedback kept on
disk across rounds), upload it with ``Coordinator.SubmitDelta`` and return the receipt.
The error-feedback residual is saved only once the coordinator accepted the upload, so a
refused or lost upload leaves the residual as it was.

Training runs on ``learn``'s twin of the served model (it shares the weights, not the
modules or the adapter mix), so completions keep flowing during a round; rounds themselves
run one at a time.

Only the domain bank is scored before and after training (``GAIN_BANK``): the one figure a
round reports, ``quality_gain``, weights the domain bank in the coordinator's default DAF
rules (a gain-weighted trimmed mean), while coarse and fine use Multi-Krum and the median,
which take no gain. Scoring every bank cost 4 forwards per bank, more than a 1-step
training; ``loss_before``/``loss_after``/``quality_gain`` are the domain bank's.

A node configured ``byzantine`` (tests and demos of robust aggregation only) scales or
negates its delta after clipping, as an attacker that ignores the protocol would.

Once the upload is accepted, the node also keeps its own delta of every bank, clipped like
the upload, as a local TALoRA pattern keyed by the embedding of the text it trained on
(:meth:`AdapterSync.store_local`), which its requests retrieve by prompt embedding. The key
is computed once per distinct local text (:meth:`Trainer.text_key`; the agent computes it at
start), not in every round.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import ErrorFeedback, encode_delta
from node_agent.adapters import AdapterError, AdapterSync, Version
from node_agent.config import NodeConfig, parse_byzantine
from node_agent.local_data import LocalData
from node_agent.metrics import Registry
from node_agent.transport import TransportError, coordinator_channel
from proto import ruvdllm_pb2 as pb
from proto import ruvdllm_pb2_grpc as pb_grpc
from ruvdllm.learn import EVAL_BATCHES, prompt_embedding, train_bank
from ruvdllm.lora import LoRAConfig
from ruvdllm.model import DiffusionLM
from ruvdllm.talora import BANKS
from ruvdllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_LOCAL_STEPS = 10_000
FEEDBACK_FILE = "error_feedback.npz"
KEY_TOKENS = 1024  # tokens of local text read (evenly spaced windows) for a pattern key
GAIN_BANK = "domain"  # the bank scored for the round's quality_gain (see the module docstring)


def eval_batches(bank: str) -> int:
    """Batches ``learn.train_bank`` scores for ``bank`` in a round: only GAIN_BANK's."""
    return EVAL_BATCHES if bank == GAIN_BANK else 0


class RoundError(RuntimeError):
    """A round this node cannot train (bad settings, no data, base version unobtainable)."""


class UploadRefused(RoundError):
    """The coordinator did not accept the delta; the message carries its reason."""


Bank = dict[str, np.ndarray]


def clip(delta: dict[str, Bank], bound: float) -> tuple[dict[str, Bank], float]:
    """Scale the whole delta down to L2 norm ≤ ``bound`` (0: no bound); returns it and its norm."""
    norm = math.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64)))
                         for bank in delta.values() for t in bank.values()))
    if bound <= 0 or norm <= bound:
        return delta, norm
    scale = np.float32(bound / norm)
    return {b: {k: t * scale for k, t in bank.items()} for b, bank in delta.items()}, norm


def fingerprint(texts: list[str]) -> str:
    """SHA-256 over the SHA-256 of each text: names a local text's patterns (their source)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


class Trainer:
    """Trains and uploads the node's update for each round it is asked to."""

    def __init__(self, cfg: NodeConfig, *, model: DiffusionLM,
                 tokenizer: Tokenizer, lora: LoRAConfig, adapters: AdapterSync,
                 data: LocalData, key: Ed25519PrivateKey, metrics: Registry) -> None:
        self.cfg, self.tokenizer, self.lora = cfg, tokenizer, lora
        self.adapters, self.data, self.key, self.metrics = adapters, data, key, metrics
        self.model = model
        self._lock = threading.Lock()
        self.byzantine = parse_byzantine(cfg.training.byzantine)
        self.feedback_path: Path = cfg.node.home / FEEDBACK_FILE
        self.last_round = 0
        self._key: tuple[str, np.ndarray] | None = None  # (text fingerprint, embedding)

    def text_key(self) -> tuple[str, np.ndarray] | None:
        """(fingerprint, embedding) of the local text on disk now; None without text."""
        texts = self.data.texts(self.cfg.training.max_chars)
        return self.key_of(texts) if texts else None

    def key_of(self, texts: list[str]) -> tuple[str, np.ndarray]:
        """(fingerprint, embedding) of ``texts``; the embedding is recomputed only when the
        text changed since the last call."""
        source = fingerprint(texts)
        if self._key is None or self._key[0] != source:
            t0 = time.perf_counter()
            self._key = (source, prompt_embedding(self.model, self.tokenizer, texts,
                                                  max_tokens=KEY_TOKENS))
            log.info("keyed local text %s in %.2f s", source[:12], time.perf_counter() - t0)
        return self._key

    def _check(self, info: pb.RoundInfo) -> tuple[int, float]:
        if info.round < 1:
            raise RoundError(f"round must be >= 1, got {info.round}")
        if not 0 < info.density <= 1:
            raise RoundError(f"density must be in (0, 1], got {info.density}")
        steps = info.local_steps or self.cfg.training.steps
        if steps > MAX_LOCAL_STEPS:
            raise RoundError(f"local_steps {steps} exceeds {MAX_LOCAL_STEPS}")
        lr = info.learning_rate or self.cfg.training.lr
        if not math.isfinite(lr) or lr <= 0 or not math.isfinite(info.clip_norm) \
                or info.clip_norm < 0:
            raise RoundError(f"learning_rate {lr} and clip_norm {info.clip_norm} must be "
                             "finite, the first > 0, the second >= 0")
        return steps, lr

    def train_round(self, request: pb.TrainRoundRequest) -> pb.TrainRoundReceipt:
        """Train, encode, upload; the receipt the ClientApp returns through Flower."""
        info = request.round
        steps, lr = self._check(info)
        deadline = float(info.options.get("deadline-unix", "inf"))
        created = float(info.options.get("message-created-unix", "0"))
        if created > 0:
            log.info("round %d: TrainRound arrived %.2f s after the ServerApp created the "
                     "message", info.round, time.time() - created)
        if not self._lock.acquire(timeout=max(0.0, min(deadline - time.time(), 3600.0))):
            raise TimeoutError(f"round {info.round}: another round is still training")
        try:
            return self._train(request, steps, lr, deadline)
        finally:
            self._lock.release()

    def _train(self, request: pb.TrainRoundRequest, steps: int, lr: float,
               deadline: float) -> pb.TrainRoundReceipt:
        info, t0 = request.round, time.perf_counter()
        try:
            base = self.adapters.base(info.base_version, bytes(info.adapter_sha256))
        except AdapterError as err:
            raise RoundError(f"round {info.round}: {err}") from None
        if base.ffa_seed != info.ffa_seed:
            raise RoundError(f"round {info.round}: announced ffa_seed {info.ffa_seed} differs "
                             f"from adapter v{base.version}'s {base.ffa_seed}")
        texts = self.data.texts(self.cfg.training.max_chars)
        if not texts:
            raise RoundError(f"no local text in {self.data.root} to train on")
        delta, metrics, examples = self._deltas(base, texts, steps, lr, info.round)
        delta, norm = clip(delta, info.clip_norm)
        local = delta  # the node keeps what it sends; the Byzantine scaling makes new dicts
        metrics["delta_norm"] = norm
        if self.byzantine is not None:
            kind, factor = self.byzantine
            delta = {b: {k: t * np.float32(factor) for k, t in bank.items()}
                     for b, bank in delta.items()}
            log.warning("round %d: BYZANTINE node (%s): delta multiplied by %g", info.round,
                        kind, factor)
        train_s = time.perf_counter() - t0
        feedback = (ErrorFeedback.load(self.feedback_path) if self.feedback_path.exists()
                    else ErrorFeedback())
        body = encode_delta(delta, round=info.round, node_id=self.cfg.node.id,
                            base_version=info.base_version, example_count=examples,
                            key=self.key, metrics=metrics, density=info.density,
                            feedback=feedback)
        if time.time() > deadline:
            raise TimeoutError(f"round {info.round}: deadline passed during local training "
                               f"({train_s:.1f} s)")
        t1 = time.perf_counter()
        receipt = self._upload(request, body, deadline)
        upload_s = time.perf_counter() - t1
        feedback.save(self.feedback_path)
        source, key = self.key_of(texts)
        self.adapters.store_local(base, local, key, source, info.round)
        signed = pb.LoRADelta.FromString(body)
        self.last_round = info.round
        self.metrics.inc("rounds_trained_total")
        self.metrics.inc("train_seconds_total", train_s)
        self.metrics.inc("upload_bytes_total", len(body))
        self.metrics.set("last_round", info.round)
        log.info("round %d: trained %d steps/bank on %d texts in %.1f s, uploaded %d bytes in "
                 "%.2f s (loss %.3f -> %.3f)", info.round, steps, len(texts), train_s, len(body),
                 upload_s, metrics["loss_before"], metrics["loss_after"])
        return pb.TrainRoundReceipt(round=info.round, node_id=self.cfg.node.id,
                                    digest=receipt.digest, size_bytes=len(body),
                                    signature=signed.signature, example_count=examples,
                                    metrics={**metrics, "train_s": train_s,
                                             "upload_s": upload_s})

    def _deltas(self, base: Version, texts: list[str], steps: int, lr: float,
                round_number: int) -> tuple[dict[str, Bank], dict[str, float], int]:
        """Per bank: train from the global adapter, delta of the B matrices, metrics.

        The metrics are GAIN_BANK's losses and gain, also under ``<bank>.<name>``.
        """
        model, tcfg = self.model, self.cfg.training
        delta: dict[str, Bank] = {}
        metrics: dict[str, float] = {}
        examples = 0
        for i, bank in enumerate(BANKS):
            init = self.adapters.adapter(base, bank)
            start = {k: v.detach().clone() for k, v in init.items()}  # train_bank trains these
            trained, stats = train_bank(model, self.tokenizer, texts, bank, lora=self.lora,
                                        init=start, ffa_seed=base.ffa_seed, steps=steps, lr=lr,
                                        seq_len=tcfg.seq_len, batch_size=tcfg.batch_size,
                                        seed=tcfg.seed + 1000 * round_number + i,
                                        eval_batches=eval_batches(bank))
            delta[bank] = {name: (trained[name].detach().float().cpu()
                                  - init[name].float()).numpy()
                           for name in init if name.endswith(".lora_B")}
            if bank == GAIN_BANK:
                for k in ("loss_before", "loss_after", "quality_gain"):
                    metrics[k] = metrics[f"{bank}.{k}"] = float(stats[k])
            examples = max(examples, int(stats["examples"]))
        return delta, metrics, max(examples, 1)

    def _upload(self, request: pb.TrainRoundRequest, body: bytes,
                deadline: float) -> pb.SubmitDeltaReceipt:
        """SubmitDelta to the announced coordinator; UploadRefused unless accepted."""
        coord = self.cfg.coordinator
        address = request.coordinator_address or coord.address
        announced = request.round.options.get("coordinator-tls")
        tls = None if announced is None else announced == "true"
        timeout = max(0.1, min(coord.timeout_s, deadline - time.time()))
        try:
            channel = coordinator_channel(address, coord.root_certificates, tls=tls,
                                          insecure=self.cfg.insecure)
        except TransportError as err:
            raise RoundError(str(err)) from None
        with channel:
            try:
                receipt = pb_grpc.CoordinatorStub(channel).SubmitDelta(
                    pb.SubmitDeltaRequest(delta=body), timeout=timeout)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(f"SubmitDelta to {address} timed out") from None
                raise RoundError(f"SubmitDelta to {address} failed: {err.code().name}: "
                                 f"{err.details()}") from None
        if not receipt.accepted:
            raise UploadRefused(f"SubmitDelta refused: {receipt.reason}: {receipt.detail}")
        return receipt
