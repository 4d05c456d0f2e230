"""Deliberately broken rejection-sampling verifiers: the statistical tests must reject each of them.

Used in-process by tests/test_sampling.py and, in live workers, by tests/test_engine_rejection.py
through tests/mutants/sitecustomize.py (a worker started with AMUSD_TEST_MUTANT=<name> and
tests/mutants on PYTHONPATH runs the named mutant in place of engine.sampling.rejection_verify).
"""
from __future__ import annotations

from engine.sampling import rejection_verify, sample_from_probs


def accept_everything(draft_tokens, draft_probs, target_probs, generator):
    """Broken verifier: trusts the draft blindly (its output follows q, not p)."""
    num_draft = draft_tokens.shape[0]
    return num_draft, int(sample_from_probs(target_probs[num_draft], generator))


def resample_target_on_rejection(draft_tokens, draft_probs, target_probs, generator):
    """Broken verifier: correct accept test, but after a rejection samples p instead of max(0, p - q)."""
    num_accepted, _ = rejection_verify(draft_tokens, draft_probs, target_probs, generator)
    return num_accepted, int(sample_from_probs(target_probs[num_accepted], generator))


MUTANTS = {"accept-everything": accept_everything, "resample-target": resample_target_on_rejection}


def install(name: str) -> None:
    """Replace the rejection step the token chooser calls, in this process."""
    import engine.token_chooser
    engine.token_chooser.rejection_verify = MUTANTS[name]
