"""The sampler against a direct transcription of LLaDA's reference algorithm, and its
fast-path guarantees: batch-size invariance, caches, threshold, early stop, hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ruvdllm.config import ModelConfig
from ruvdllm.model import DiffusionLM
from ruvdllm.sampler import Sampler, SamplerConfig, SamplerError, StepState

MASK, EOS = 3, 2


def tiny_model(device: str = "cpu", seed: int = 0) -> DiffusionLM:
    """A random 2-layer GQA model whose confidences spread out (sharpened LM head)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=128,
                      vocab_size=512, embedding_size=512, mask_token_id=MASK, eos_token_id=EOS,
                      max_sequence_length=256)
    m = DiffusionLM(cfg).eval()
    with torch.no_grad():
        m.transformer.ff_out.weight.mul_(8)
    return m.to(device)


@pytest.fixture(scope="module")
def model() -> DiffusionLM:
    return tiny_model()


def llada_reference(model: DiffusionLM, prompt: list[int], steps: int, gen_length: int,
                    block_length: int, suffix: int | None = None) -> list[int]:
    """LLaDA's greedy low-confidence remasking, written out plainly for one prompt;
    with ``suffix``, the model sees only that many masks after the block (DPad)."""
    x = torch.tensor([prompt + [MASK] * gen_length])
    P = len(prompt)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for b in range(n_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        seen = x.shape[1] if suffix is None else hi + suffix
        n_mask = int((x[0, lo:hi] == MASK).sum())
        counts = [n_mask // per_block] * per_block
        for i in range(n_mask % per_block):
            counts[i] += 1
        for k in counts:
            with torch.no_grad():
                logits = model(x[:, :seen]).logits[0]
            probs = F.softmax(logits.float(), dim=-1)
            pred = logits.argmax(-1)
            conf = probs.gather(-1, pred[:, None]).squeeze(-1).double()
            conf[:lo] = -torch.inf
            conf[hi:] = -torch.inf
            conf[x[0, :seen] != MASK] = -torch.inf
            chosen = torch.topk(conf, k).indices
            x[0, chosen] = pred[chosen]
    ans = x[0, P:].tolist()
    return ans[: ans.index(EOS)] if EOS in ans else ans


PROMPTS = [[1, 50, 60, 70, 80], [1, 9, 8], [1, 100, 101, 102, 103, 104, 105, 106], [1, 42]]


@pytest.mark.parametrize("steps,gen,block", [(16, 16, 8), (12, 24, 8), (5, 10, 10)])
def test_reference_matches_llada(model, steps, gen, block):
    cfg = SamplerConfig(steps=steps, gen_length=gen, block_length=block)
    for p in PROMPTS[:2]:
        assert Sampler(model).generate([p], cfg)[0] == llada_reference(model, p, steps, gen, block)


@pytest.mark.parametrize("suffix", [0, 3, 8])
def test_suffix_window_matches_llada_on_the_cut_sequence(model, suffix):
    cfg = SamplerConfig(steps=12, gen_length=24, block_length=8, suffix=suffix)
    for p in PROMPTS[:2]:
        assert Sampler(model).generate([p], cfg)[0] == llada_reference(model, p, 12, 24, 8,
                                                                       suffix)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual", "delayed"])
def test_suffix_window_past_the_answer_changes_nothing_and_a_short_one_does(model, cache):
    base = SamplerConfig(steps=12, gen_length=24, block_length=8, cache=cache)
    full = Sampler(model).generate(PROMPTS, base)
    wide = SamplerConfig(steps=12, gen_length=24, block_length=8, cache=cache, suffix=16)
    assert Sampler(model).generate(PROMPTS, wide) == full  # the last block start sees all
    short = SamplerConfig(steps=12, gen_length=24, block_length=8, cache=cache, suffix=0)
    assert Sampler(model).generate(PROMPTS, short) != full


@pytest.mark.parametrize("options", [{}, {"threshold": 0.3, "cache": "prefix"},
                                     {"threshold": 0.3, "cache": "dual"}, {"early_stop": True},
                                     {"cache": "delayed", "suffix": 8}])
def test_batch_size_does_not_change_greedy_output(model, options):
    cfg = SamplerConfig(steps=16, gen_length=16, block_length=8, **options)
    alone = [Sampler(model).generate([p], cfg)[0] for p in PROMPTS]
    together = Sampler(model).generate(PROMPTS, cfg)
    assert together == alone


class Recorder:
    def __init__(self, remask_at: int | None = None) -> None:
        self.states: list[StepState] = []
        self.remask_at = remask_at

    def before_forward(self, state: StepState) -> None:
        self.states.append(state)

    def after_forward(self, state: StepState) -> torch.Tensor | None:
        assert state.masked is not None
        if state.step == self.remask_at or state.last_step:
            return ~state.masked  # ask to re-mask every committed position of the block
        return None


def test_threshold_uses_fewer_forwards_and_commits_at_least_one(model):
    slow, fast = Recorder(), Recorder()
    Sampler(model, [slow]).generate([PROMPTS[0]], SamplerConfig(steps=32, gen_length=32,
                                                                block_length=16))
    # a random model's confidences are 0.02-0.05 whatever the seed: 0.01 lets many through
    Sampler(model, [fast]).generate([PROMPTS[0]], SamplerConfig(steps=32, gen_length=32,
                                                                block_length=16, threshold=0.01))
    assert len(slow.states) == 32
    assert 2 <= len(fast.states) < 32  # >= 1 forward per block, fewer than the fixed schedule
    strict = Recorder()  # nothing crosses 0.99: one commit per step, and the answer completes
    sampler = Sampler(model, [strict])
    sampler.generate([PROMPTS[0]], SamplerConfig(steps=32, gen_length=32, block_length=16,
                                                 threshold=0.99))
    assert len(strict.states) == 32 and MASK not in sampler.answers[0]


def test_hook_sees_t_fall_and_remask_is_honoured_but_not_at_last_step(model):
    rec = Recorder(remask_at=1)
    sampler = Sampler(model, [rec])
    events = list(sampler.stream([PROMPTS[0]], SamplerConfig(steps=8, gen_length=8,
                                                             block_length=8)))
    ts = [float(s.t[0]) for s in rec.states]
    assert ts[0] == 1.0 and ts[-1] > 0
    assert events[1].remasked[0], "committed positions asked for at step 1 are masked again"
    assert not events[-1].remasked[0], "never re-mask at the last step"
    assert MASK not in sampler.answers[0]


def test_stream_events_rebuild_the_answer(model):
    sampler = Sampler(model)
    P = len(PROMPTS[2])
    answer = [MASK] * 16
    for ev in sampler.stream([PROMPTS[2]], SamplerConfig(steps=8, gen_length=16,
                                                         block_length=8)):
        for pos, tok in ev.committed[0]:
            answer[pos - P] = tok
    expected = sampler.answers[0]
    assert answer[: len(expected)] == expected


def test_early_stop_ends_once_eos_is_settled(model):
    def favour_eos(_module, _inputs, out):
        out[..., EOS] += 50.0
        return out

    handle = model.transformer.ff_out.register_forward_hook(favour_eos)
    try:
        rec = Recorder()
        cfg = SamplerConfig(steps=32, gen_length=32, block_length=8, early_stop=True)
        out = Sampler(model, [rec]).generate([PROMPTS[0]], cfg)
        assert out == [[]]
        assert len(rec.states) == 1  # EOS settles at the first answer position at step 0
        rec_full = Recorder()
        Sampler(model, [rec_full]).generate([PROMPTS[0]], SamplerConfig(
            steps=32, gen_length=32, block_length=8))
        assert len(rec_full.states) == 32
    finally:
        handle.remove()


@pytest.mark.parametrize("options,message", [
    ({"gen_length": 30, "block_length": 8}, "not divisible"),
    ({"steps": 2, "gen_length": 32, "block_length": 8}, "fewer than"),
    ({"steps": 6, "gen_length": 32, "block_length": 8}, "multiple"),
    ({"gen_length": 512, "block_length": 32}, "max_sequence_length"),
    ({"threshold": 1.5}, "threshold"),
    ({"suffix": -1}, "suffix must be >= 0"),
])
def test_bad_options_refused(model, options, message):
    with pytest.raises(SamplerError, match=message):
        Sampler(model).generate([PROMPTS[0]], SamplerConfig(**options))


def test_temperature_sampling_is_seeded(model):
    cfg = dict(steps=8, gen_length=8, block_length=8, temperature=1.0)
    a = Sampler(model).generate([PROMPTS[0]], SamplerConfig(seed=1, **cfg))
    b = Sampler(model).generate([PROMPTS[0]], SamplerConfig(seed=1, **cfg))
    c = Sampler(model).generate([PROMPTS[0]], SamplerConfig(seed=2, **cfg))
    assert a == b and a != c


def test_repetition_penalty_pushes_down_tokens_already_present():
    from ruvdllm.sampler import penalize_repeats

    logits = torch.tensor([[[2.0, -2.0, 2.0, 1.0, 0.5]]])  # (B=1, T=1, V=5)
    x = torch.tensor([[0, 1, 3, 3]])
    out = penalize_repeats(logits, x, 2.0, special=[3])
    assert out.tolist() == [[[1.0, -4.0, 2.0, 1.0, 0.5]]]  # 0 and 1 seen; 3 special; 2, 4 unseen


def test_repetition_penalty_raises_distinct_ngrams(model):
    from ruvdllm.evaluate import distinct_n

    cfg = dict(steps=32, gen_length=32, block_length=32)
    plain = Sampler(model).generate(PROMPTS, SamplerConfig(**cfg))
    penal = Sampler(model).generate(PROMPTS, SamplerConfig(repetition_penalty=1.5, **cfg))
    assert sum(map(distinct_n, penal)) > sum(map(distinct_n, plain))
