"""engine.sampling: logits processing, coupled Gumbel-max sampling, rejection sampling, logprobs.

Statistical tests use fixed seeds, so their p-values are deterministic: they cannot flake.
"""
from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.messages import SamplingParams
from engine.sampling import (
    CoupledNoiseCache, choose_tokens, coupled_choice, coupled_gumbel, coupled_noise, probs_from_scores,
    process_logits, rejection_verify, sample_from_probs, top_logprobs, with_request_seed,
)
from tests.rejection_mutants import accept_everything, resample_target_on_rejection

ALPHA = 1e-3   # significance of every chi-square test below
REPO_ROOT = Path(__file__).resolve().parents[1]


def chi_square_p_value(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit: P(X >= statistic) under the expected distribution."""
    observed = observed.double().flatten()
    expected = expected_probs.double().flatten() * observed.sum()
    assert expected.min() >= 5, "too few expected counts for a chi-square test"
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = observed.numel() - 1
    try:
        from scipy.stats import chi2
        return float(chi2.sf(statistic, dof))
    except ImportError:   # Wilson-Hilferty approximation
        z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
        return 0.5 * math.erfc(z / math.sqrt(2))


# ---- process_logits ----------------------------------------------------------------

def test_top_k_keeps_exactly_k_finite_entries():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    scores = process_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isfinite(scores).sum(dim=-1).tolist() == [2, 2]
    assert set(torch.isfinite(scores[0]).nonzero().flatten().tolist()) <= {1, 2, 3}


def test_top_p_keeps_smallest_prefix_with_enough_mass():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64)   # sorted: 0.5, 0.3, 0.15, 0.05
    for top_p, kept in [(0.3, {1}), (0.49, {1}), (0.51, {1, 3}), (0.79, {1, 3}), (0.81, {1, 2, 3}),
                        (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})]:
        scores = process_logits(probs.log(), SamplingParams(temperature=1.0, top_p=top_p))
        assert set(torch.isfinite(scores).nonzero().flatten().tolist()) == kept, top_p
        assert torch.allclose(scores[list(kept)], probs.log()[list(kept)])


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    scores = process_logits(probs.log(), SamplingParams(temperature=1.0, min_p=0.2))   # threshold 0.1
    assert torch.isfinite(scores).tolist() == [True, True, True, False]


def test_temperature_scales_and_defaults_are_a_no_op():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores = process_logits(logits, SamplingParams(temperature=0.5))
    assert scores.dtype == torch.float64 and torch.allclose(scores, logits * 2)
    unchanged = process_logits(logits, SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0))
    assert torch.equal(unchanged, logits)
    assert process_logits(logits.to(torch.bfloat16), SamplingParams(temperature=1.0)).dtype == torch.float32
    assert torch.allclose(probs_from_scores(unchanged).sum(-1), torch.ones(3, dtype=torch.float64))


# ---- coupled sampling --------------------------------------------------------------

def reference_gumbel(seed: int, position: int, token_id: int) -> float:
    """Pure-Python spec of the coupled noise (independent of torch)."""
    mask = (1 << 64) - 1

    def splitmix64(x: int) -> int:
        x &= mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    key = splitmix64(splitmix64(seed) + position)
    uniform = ((splitmix64(key + (token_id + 1) * 0x9E3779B97F4A7C15) >> 12) + 0.5) * 2.0 ** -52
    return -math.log(-math.log(uniform))


def test_coupled_noise_matches_pure_python_reference():
    for seed, position in [(0, 0), (12345, 7), (2**63 - 1, 10**6)]:
        noise = coupled_gumbel(seed, position, 50)
        assert noise.dtype == torch.float32 and noise.shape == (50,)
        for token_id in (0, 1, 31, 49):
            assert noise[token_id].item() == pytest.approx(reference_gumbel(seed, position, token_id), rel=1e-6)


def test_coupled_noise_is_reproducible_across_calls_and_processes():
    noise = coupled_gumbel(2024, 3, 1000)
    assert torch.equal(noise, coupled_gumbel(2024, 3, 1000))
    assert not torch.equal(noise, coupled_gumbel(2024, 4, 1000))
    assert not torch.equal(noise, coupled_gumbel(2025, 3, 1000))
    code = ("import hashlib; from engine.sampling import coupled_gumbel; "
            "print(hashlib.sha256(coupled_gumbel(2024, 3, 1000).numpy().tobytes()).hexdigest())")
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert child.stdout.strip() == hashlib.sha256(noise.numpy().tobytes()).hexdigest()


def test_coupled_noise_rows_batches_and_vocab_prefixes_agree():
    batch = coupled_noise(7, 10, 4, 300)
    for row in range(4):
        assert torch.equal(batch[row], coupled_gumbel(7, 10 + row, 300))
    assert torch.equal(coupled_noise(7, 10, 4, 100), batch[:, :100])   # padded vocab: same prefix
    cache = CoupledNoiseCache(seed=7, vocab_size=300, max_positions=3)
    assert torch.equal(cache.noise(11, 2), batch[1:3])
    assert torch.equal(cache.noise(10, 4), batch)
    assert torch.equal(cache.noise(12, 2), batch[2:4]) and len(cache.rows) <= 4


def test_gumbel_max_frequencies_match_tempered_softmax():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0], dtype=torch.float64)
    params = SamplingParams(temperature=0.7)
    expected = torch.softmax(logits / 0.7, dim=-1)
    # many positions of one seed (vectorised) ...
    num_samples = 20_000
    tokens = coupled_choice(process_logits(logits.expand(num_samples, -1), params), seed=1, start_position=0)
    assert chi_square_p_value(torch.bincount(tokens, minlength=6), expected) > ALPHA
    # ... and one position of many seeds
    tokens = torch.stack([choose_tokens(logits[None], SamplingParams(temperature=0.7, seed=s), 5)[0]
                          for s in range(1000)])
    assert chi_square_p_value(torch.bincount(tokens, minlength=6), expected) > ALPHA


def test_gumbel_max_respects_filters():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0], dtype=torch.float64)
    params = SamplingParams(temperature=1.3, top_k=3, seed=3)
    scores = process_logits(logits.expand(5000, -1), params)
    counts = torch.bincount(coupled_choice(scores, params.seed, 0), minlength=6)
    assert counts[[2, 4, 5]].tolist() == [0, 0, 0]
    assert chi_square_p_value(counts[[0, 1, 3]], probs_from_scores(scores[0])[[0, 1, 3]]) > ALPHA


def test_choose_tokens_batch_equals_per_position_and_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=99)
    batch = choose_tokens(logits, params, start_position=4)
    single = [choose_tokens(logits[i:i + 1], params, start_position=4 + i)[0] for i in range(6)]
    assert batch.tolist() == [int(t) for t in single]
    cache = CoupledNoiseCache(seed=99, vocab_size=50)
    assert torch.equal(choose_tokens(logits, params, 4, noise_cache=cache), batch)
    assert torch.equal(choose_tokens(logits, SamplingParams(temperature=0.0), 0), logits.argmax(-1))
    with pytest.raises(ValueError, match="seed"):
        choose_tokens(logits, SamplingParams(temperature=1.0), 0)
    assert with_request_seed(params) is params
    assert with_request_seed(SamplingParams(temperature=1.0)).seed is not None


def toy_logits(token_ids: list[int], model_seed: int) -> torch.Tensor:
    """A deterministic toy language model: logits[V=8] as a function of the whole prefix."""
    generator = torch.Generator().manual_seed(hash((model_seed, *token_ids)) % 2**62)
    return torch.randn(8, generator=generator)


def test_coupled_speculative_decoding_reproduces_non_speculative_run():
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=31)
    prompt, num_new, num_draft = [1, 2], 24, 3
    target = lambda ids: toy_logits(ids, 0)
    draft = lambda ids: target(ids) + 0.8 * toy_logits(ids, 1)   # close to the target, not equal
    reference = []
    for position in range(num_new):
        reference += choose_tokens(target(prompt + reference)[None], params, position).tolist()
    output, num_accepted_total = [], 0
    while len(output) < num_new:
        drafts = []
        for k in range(num_draft):
            drafts += choose_tokens(draft(prompt + output + drafts)[None], params, len(output) + k).tolist()
        verify_logits = torch.stack([target(prompt + output + drafts[:k]) for k in range(num_draft + 1)])
        verified = choose_tokens(verify_logits, params, len(output)).tolist()
        num_accepted = next((k for k in range(num_draft) if drafts[k] != verified[k]), num_draft)
        output += drafts[:num_accepted] + [verified[num_accepted]]
        num_accepted_total += num_accepted
    assert output[:num_new] == reference
    assert 0 < num_accepted_total < num_new   # both paths (accept and reject) were exercised


# ---- rejection sampling -------------------------------------------------------------

VOCAB = 5


def random_distributions(seed: int, shape: tuple[int, ...], sharpness: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(*shape, VOCAB, generator=generator, dtype=torch.float64), -1)


# Target p (the "model") and a deliberately different draft q, conditioned on up to 2 previous tokens.
TARGET_1, TARGET_2, TARGET_3 = (random_distributions(10, (), 0.6), random_distributions(11, (VOCAB,), 0.6),
                                random_distributions(12, (VOCAB, VOCAB), 0.6))
DRAFT_1, DRAFT_2 = random_distributions(20, (), 1.5), random_distributions(21, (VOCAB,), 1.5)


def first_two_tokens(verify, num_runs: int, seed: int) -> torch.Tensor:
    """Run speculative decoding (K=2 drafts, then K=1 if only one token came out) num_runs times
    -> LongTensor[num_runs, 2] of the first two generated tokens."""
    generator = torch.Generator().manual_seed(seed)
    drafts_1 = sample_from_probs(DRAFT_1.expand(num_runs, VOCAB), generator)              # [R]
    drafts_2 = sample_from_probs(DRAFT_2[drafts_1], generator)                             # [R]
    drafts = torch.stack([drafts_1, drafts_2], dim=1)                                      # [R, 2]
    redrafts = sample_from_probs(DRAFT_2.expand(num_runs, VOCAB, VOCAB), generator)       # [R, V]: after token a
    draft_probs_after = torch.stack([DRAFT_1.expand(VOCAB, VOCAB), DRAFT_2], dim=1)       # [a, 2, V]
    target_probs_after = torch.stack([TARGET_1.expand(VOCAB, VOCAB, VOCAB),                # [a, b, 3, V]
                                      TARGET_2[:, None].expand(VOCAB, VOCAB, VOCAB), TARGET_3], dim=2)
    outputs = []
    for run, (d1, d2) in enumerate(drafts.tolist()):
        num_accepted, next_token = verify(drafts[run], draft_probs_after[d1], target_probs_after[d1, d2], generator)
        generated = [d1, d2][:num_accepted] + [next_token]
        if len(generated) == 1:                                                            # second step, K=1
            first = generated[0]
            redraft = redrafts[run, first:first + 1]
            num_accepted, next_token = verify(redraft, draft_probs_after[first, 1:],
                                              target_probs_after[first, int(redraft), 1:], generator)
            generated += [int(redraft)][:num_accepted] + [next_token]
        outputs.append(generated[:2])
    return torch.tensor(outputs)


def speculative_fit_p_values(verify, num_runs: int = 10_000) -> tuple[float, float]:
    """p-values of (first token ~ p) and (first two tokens ~ p, as V*V pairs)."""
    tokens = first_two_tokens(verify, num_runs, seed=1234)
    first_counts = torch.bincount(tokens[:, 0], minlength=VOCAB)
    pair_counts = torch.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB * VOCAB)
    pair_probs = TARGET_1[:, None] * TARGET_2                                              # exact enumeration
    return chi_square_p_value(first_counts, TARGET_1), chi_square_p_value(pair_counts, pair_probs)


def test_rejection_sampling_output_follows_target_distribution():
    first_p_value, pair_p_value = speculative_fit_p_values(rejection_verify)
    assert first_p_value > ALPHA and pair_p_value > ALPHA, (first_p_value, pair_p_value)


@pytest.mark.parametrize("broken_verify", [accept_everything, resample_target_on_rejection])
def test_broken_verifier_fails_the_same_test(broken_verify):
    first_p_value, pair_p_value = speculative_fit_p_values(broken_verify)
    assert first_p_value < ALPHA and pair_p_value < ALPHA, (first_p_value, pair_p_value)


def test_rejection_verify_edge_cases():
    generator = torch.Generator().manual_seed(0)
    one_hot = torch.eye(VOCAB, dtype=torch.float64)
    # draft == target: always accepted, bonus from the last row
    assert rejection_verify(torch.tensor([2, 4]), one_hot[[2, 4]], one_hot[[2, 4, 1]], generator) == (2, 1)
    # target gives the draft token 0 probability: rejected, residual max(0, p - q) = p here
    assert rejection_verify(torch.tensor([2]), one_hot[[2]], one_hot[[3, 0]], generator) == (0, 3)
    # p == q but draft token impossible under both: residual is all zero, falls back to p
    uniform = torch.full((1, VOCAB), 1 / VOCAB, dtype=torch.float64)
    uniform_without_0 = torch.tensor([[0, 0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    num_accepted, next_token = rejection_verify(torch.tensor([0]), uniform_without_0,
                                                torch.cat([uniform_without_0, uniform]), generator)
    assert num_accepted == 0 and next_token != 0


def test_sample_from_probs_never_picks_zero_probability_tokens():
    probs = torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0])   # unnormalised weights
    samples = sample_from_probs(probs.expand(3000, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(samples, minlength=5)
    assert counts[[0, 2, 4]].tolist() == [0, 0, 0]
    assert chi_square_p_value(counts[[1, 3]], torch.tensor([2 / 3, 1 / 3])) > ALPHA


# ---- logprobs -----------------------------------------------------------------------

def test_top_logprobs_are_model_log_softmax():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    token_ids = torch.tensor([4, 0, 19])
    expected = torch.log_softmax(logits, dim=-1)
    result = top_logprobs(logits, token_ids, num_top=3)
    assert [r.token_id for r in result] == [4, 0, 19]
    for row, item in enumerate(result):
        assert isinstance(item.logprob, float)
        assert item.logprob == pytest.approx(expected[row, token_ids[row]].item(), abs=1e-6)
        assert [t for t, _ in item.top] == expected[row].topk(3).indices.tolist()
        assert all(isinstance(v, float) for _, v in item.top)
        assert [v for _, v in item.top] == sorted((v for _, v in item.top), reverse=True)
    assert all(item.top == [] for item in top_logprobs(logits, token_ids, num_top=0))
