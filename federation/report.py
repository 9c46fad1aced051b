"""Measure the codec and the aggregators; prints the tables of docs/benchmarks.md.

    python -m federation.report [--seed 0]

Compression: a LoRA-sized delta, the rank-8 B matrices (384 × 8) of q/k/v/attn_out in 6
layers for each of the 3 banks (72 tensors, 221,184 float32 values), entries i.i.d. N(0, 1)
(no structure for top-k to exploit, so a pessimistic case). Reported per density: the size
of the whole signed LoRADelta message, its ratio to the dense float32 bytes, the relative
L2 error ‖ŷ − Δ‖/‖Δ‖ of one round, and the relative error of the sum of 10 rounds of
independent deltas, ‖Σŷ − ΣΔ‖/‖ΣΔ‖, without and with error feedback.

Robustness: n = 10 updates in R^50, 7 honest (`attacks.honest_updates`), 3 from each attack
of `attacks.ATTACKS`; each rule runs with f = 3 (Bulyan with f = 1, the most n = 10 allows)
and is scored by ‖aggregate − honest mean‖, next to `mean`'s.
"""

import argparse
import time
from functools import partial

import numpy as np

from federation.aggregators import RULES, aggregate
from federation.attacks import ATTACKS, honest_updates
from federation.codec import ErrorFeedback, decode_delta, encode_delta
from federation.daf import BANKS
from federation.signing import generate_key

TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out")


def lora_delta(
    rng: np.random.Generator, d_model: int = 384, rank: int = 8, layers: int = 6
) -> dict:
    """Per-bank LoRA B deltas of the benchmark model (see the module docstring)."""
    return {
        bank: {
            f"blocks.{i}.{target}.lora_B": rng.normal(size=(d_model, rank)).astype(np.float32)
            for i in range(layers)
            for target in TARGETS
        }
        for bank in BANKS
    }


def _flat(banks: dict) -> np.ndarray:
    return np.concatenate([np.ravel(banks[b][n]) for b in sorted(banks) for n in sorted(banks[b])])


def compression_row(density: float, seed: int, rounds: int = 10) -> dict[str, float]:
    """Size, ratio, one-round error, and error-feedback error of the summed deltas."""
    rng, key = np.random.default_rng(seed), generate_key()
    encode = partial(
        encode_delta, node_id="bench", base_version=0, example_count=1, key=key, density=density
    )
    delta = lora_delta(rng)
    start = time.perf_counter()
    data = encode(delta, round=1)
    encode_s = time.perf_counter() - start
    x, y = _flat(delta), _flat(decode_delta(data).tensors)
    summed_error = {}
    for name, feedback in (("no_ef", None), ("ef", ErrorFeedback())):
        step_rng, true_sum, sent_sum = (
            np.random.default_rng(seed + 1),
            np.zeros_like(x),
            np.zeros_like(x),
        )
        for r in range(rounds):
            step = lora_delta(step_rng)
            encoded = encode(step, round=r + 1, feedback=feedback)
            true_sum += _flat(step)
            sent_sum += _flat(decode_delta(encoded).tensors)
        summed_error[name] = float(np.linalg.norm(sent_sum - true_sum) / np.linalg.norm(true_sum))
    return {
        "bytes": len(data),
        "ratio": x.size * 4 / len(data),
        "error": float(np.linalg.norm(y - x) / np.linalg.norm(x)),
        "sum_error": summed_error["no_ef"],
        "ef_error": summed_error["ef"],
        "encode_ms": encode_s * 1e3,
    }


def robustness_matrix(
    seed: int, n: int = 10, f: int = 3, d: int = 50
) -> dict[str, dict[str, float]]:
    """{attack: {rule: ‖aggregate − honest mean‖}} for the scenario of the module docstring."""
    out = {}
    for attack_name, attack in ATTACKS.items():
        rng = np.random.default_rng(seed)
        honest = honest_updates(n - f, d, rng)
        updates = np.vstack([honest, attack(honest, f, rng)])
        target = honest.mean(axis=0)
        out[attack_name] = {
            rule: float(
                np.linalg.norm(
                    aggregate(updates, rule, f=bulyan_f(n) if rule == "bulyan" else f) - target
                )
            )
            for rule in RULES
        }
    return out


def bulyan_f(n: int) -> int:
    """Largest f Bulyan accepts for n updates (n >= 4f + 3)."""
    return max(0, (n - 3) // 4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    seed = parser.parse_args().seed
    print(
        "| density | LoRADelta bytes | ratio vs fp32 | rel. error, 1 round "
        "| rel. error of 10-round sum, no EF | same, with EF | encode ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for density in (0.01, 0.05, 0.10, 1.0):
        r = compression_row(density, seed)
        cells = [
            f"{r['bytes']:,}",
            f"{r['ratio']:.1f}×",
            f"{r['error']:.3f}",
            f"{r['sum_error']:.3f}",
        ]
        cells += [f"{r['ef_error']:.3f}", f"{r['encode_ms']:.0f}"]
        print(f"| {density:.0%} | " + " | ".join(cells) + " |")
    print()
    matrix = robustness_matrix(seed)
    print("| attack | " + " | ".join(RULES) + " |")
    print("|---|" + "---|" * len(RULES))
    for attack_name, row in matrix.items():
        print(f"| {attack_name} | " + " | ".join(f"{row[rule]:.2f}" for rule in RULES) + " |")


if __name__ == "__main__":
    main()
