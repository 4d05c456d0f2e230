"""engine/mode_auto.py without workers: the measuring exchange, its failures, and the decision cache."""
from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.messages import Measure, Measured, MeasureStop, WorkerFailed, WorkerReady
from engine.mode_auto import MeasureError, load_decision, measure_mode_costs, save_decision


class FakeQueue(list):
    def put(self, msg) -> None:
        self.append(msg)


class FakeWorker:
    def __init__(self, role: str, costs: list[float], is_alive: bool = True):
        self.role, self.is_alive, self.cmd_queue = role, is_alive, FakeQueue()
        self.ready = WorkerReady(role, 1, 10, [], 0.0, "", {"forward_costs_s": costs, "costs_id": f"{role}-id"})


def _config(tmp_path, **overrides) -> EngineConfig:
    return EngineConfig(verify_model="v", draft_model="d", mode="auto", cache_dir=str(tmp_path), step_timeout_s=1.0,
                        **overrides)


def test_answers_in_any_order_are_kept_and_the_draft_is_stopped(tmp_path):
    workers = {"verify": FakeWorker("verify", [0.1, 0.11]), "draft": FakeWorker("draft", [0.04])}
    answers = iter([Measured("draft", "together", [0.06]), None, Measured("verify", "together", [0.15, 0.16]),
                    Measured("verify", "wide", [0.07, 0.08]), Measured("draft", "wide", [0.03])])
    costs = measure_mode_costs(workers, _config(tmp_path), lambda timeout_s: next(answers))
    assert costs.for_mode("async")[0].seconds == (0.15, 0.16) and costs.for_mode("async")[1].seconds == (0.06,)
    assert costs.for_mode("ar") == (costs.verify_wide, None) and costs.draft_wide.seconds == (0.03,)
    assert [type(m) for m in workers["draft"].cmd_queue] == [Measure, MeasureStop, Measure]
    assert [m.placement for m in workers["verify"].cmd_queue] == ["together", "wide"] and not costs.is_disturbed
    # cached: a second call asks nothing
    again = {"verify": FakeWorker("verify", [0.1, 0.11]), "draft": FakeWorker("draft", [0.04])}
    assert measure_mode_costs(again, _config(tmp_path), lambda timeout_s: pytest.fail("measured again")) == costs
    assert not again["verify"].cmd_queue


@pytest.mark.parametrize("failure, message", [
    ("dies", "verify worker exited while measuring"),
    ("fails", "draft worker failed while measuring: boom"),
    ("silent", "verify worker did not answer within 1s"),
])
def test_a_worker_that_fails_while_measuring_is_a_clear_error(tmp_path, failure, message):
    workers = {"verify": FakeWorker("verify", [0.1], is_alive=failure != "dies"), "draft": FakeWorker("draft", [0.04])}
    reply = WorkerFailed("draft", None, "boom", "") if failure == "fails" else None
    with pytest.raises(MeasureError, match=message):
        measure_mode_costs(workers, _config(tmp_path), lambda timeout_s: reply)


def test_a_decision_belongs_to_its_configuration(tmp_path):
    config = _config(tmp_path)
    save_decision(config, "ar", "because", "verify-id")
    assert load_decision(config.replace(mode="async")) == {"mode": "ar", "reason": "because", "verify_costs_id": "verify-id"}
    assert load_decision(_config(tmp_path, acceptance_prior=0.9)) is None      # any other setting decides anew


def test_max_num_seqs_batches_every_mode_and_says_where_async_cannot(tmp_path):
    assert not _config(tmp_path, max_num_seqs=8).warnings()                  # auto: applies to the mode it picks
    assert not _config(tmp_path, max_num_seqs=8).replace(mode="sync").warnings()
    batched = _config(tmp_path, max_num_seqs=8).replace(mode="async")
    assert not batched.warnings() and batched.is_async_batched and batched.num_shared_slots == 8
    for change, why in [(dict(sampling_scheme="rejection"), "coupled scheme only"), (dict(decoder="hf"), "lean decoder"),
                        (dict(draft_device="cuda:0"), "CPU workers only")]:
        config = batched.replace(**change)
        assert not config.is_async_batched and config.num_shared_slots == 1
        assert any(why in w and "one request at a time" in w for w in config.warnings()), change
    with pytest.raises(Exception, match="max_num_seqs must be >= 1"):
        _config(tmp_path, max_num_seqs=0)


def test_mode_auto_says_when_its_choice_does_not_batch(tmp_path):
    from engine.supervisor import EngineSupervisor
    assert EngineSupervisor(_config(tmp_path, max_num_seqs=8))._batching_note("async") == ""    # async batches
    assert EngineSupervisor(_config(tmp_path, max_num_seqs=8))._config_for("async").max_num_seqs == 8
    sup = EngineSupervisor(_config(tmp_path, max_num_seqs=8, sampling_scheme="rejection"))
    assert "async decodes one request at a time here: async batching samples with the coupled scheme only" \
        in sup._batching_note("async")
    assert sup._config_for("async").max_num_seqs == 1 and sup._config_for("ar").max_num_seqs == 8
    assert sup._batching_note("ar") == sup._batching_note("sync") == ""
    assert EngineSupervisor(_config(tmp_path, max_num_seqs=1))._batching_note("async") == ""


def test_wide_costs_slower_than_one_core_alone_twice_are_used_but_not_cached(tmp_path):
    """Something else ran while measuring (another server starting): keeping those costs would make
    every later start of this pair decide with them."""
    workers = {"verify": FakeWorker("verify", [0.08, 0.09]), "draft": FakeWorker("draft", [0.04])}
    answers = [Measured("verify", "together", [0.1, 0.11]), Measured("draft", "together", [0.05]),
               Measured("verify", "wide", [0.3, 0.3]), Measured("draft", "wide", [0.03]),
               Measured("verify", "wide", [0.4, 0.2])]            # measured again: still slow at one token
    replies = iter(answers)
    costs = measure_mode_costs(workers, _config(tmp_path), lambda timeout_s: next(replies))
    assert costs.verify_wide.seconds == (0.3, 0.2) and costs.is_disturbed      # the faster of the two, per k
    replies = iter(answers)                                     # not cached: the next start measures again
    measure_mode_costs(workers, _config(tmp_path), lambda timeout_s: next(replies))
    assert len([m for m in workers["verify"].cmd_queue if isinstance(m, Measure)]) == 6


def test_a_passing_blip_in_the_wide_costs_is_measured_again_and_cached(tmp_path):
    workers = {"verify": FakeWorker("verify", [0.08, 0.09]), "draft": FakeWorker("draft", [0.04])}
    replies = iter([Measured("verify", "together", [0.1, 0.11]), Measured("draft", "together", [0.05]),
                    Measured("verify", "wide", [0.3, 0.06]), Measured("draft", "wide", [0.03]),
                    Measured("verify", "wide", [0.07, 0.08])])
    costs = measure_mode_costs(workers, _config(tmp_path), lambda timeout_s: next(replies))
    assert costs.verify_wide.seconds == (0.07, 0.06) and not costs.is_disturbed
    assert [m.placement for m in workers["verify"].cmd_queue] == ["together", "wide", "wide"]
    again = {"verify": FakeWorker("verify", [0.08, 0.09]), "draft": FakeWorker("draft", [0.04])}
    assert measure_mode_costs(again, _config(tmp_path), lambda timeout_s: pytest.fail("measured again")) == costs


class SleepingRunner:
    """Stands in for a ModelRunner: a forward of k tokens sleeps k * step_s; `slow_after` forwards
    in, steps take twice as long (the machine got busier)."""

    def __init__(self, step_s: float, slow_after: int | None = None):
        self.step_s, self.slow_after, self.num_forwards, self.vocab_size = step_s, slow_after, 0, 10
        self.device = __import__("torch").device("cpu")

    def prefill(self, token_ids):
        pass

    def forward(self, token_ids):
        import time
        self.num_forwards += 1
        is_slow = self.slow_after is not None and self.num_forwards > self.slow_after
        time.sleep(len(token_ids) * self.step_s * (2 if is_slow else 1))

    def crop(self, num_tokens):
        pass

    def reset(self):
        pass


@pytest.mark.parametrize("slow_after, is_cached", [(None, True), (8, False)])
def test_forward_costs_that_drift_while_measured_are_used_but_not_cached(tmp_path, slow_after, is_cached):
    import glob
    import os

    from engine.calibration import load_or_measure
    costs = load_or_measure(SleepingRunner(0.015, slow_after), {"role": "verify"}, str(tmp_path), 2)
    assert costs.cost(1) >= 0.015
    assert bool(glob.glob(os.path.join(tmp_path, "costs", "*.json"))) == is_cached


@pytest.mark.parametrize("verify_wide, is_kept", [([0.3, 0.3], False), ([0.09, 0.095], True)])
def test_a_mode_chosen_from_disturbed_costs_is_not_kept(tmp_path, monkeypatch, verify_wide, is_kept):
    """A decision made while something else ran would otherwise start every later server in that mode."""
    from engine.supervisor import EngineSupervisor
    sup = EngineSupervisor(_config(tmp_path))
    sup._workers = {"verify": FakeWorker("verify", [0.08, 0.09]), "draft": FakeWorker("draft", [0.01])}
    replies = iter([Measured("verify", "together", [0.085, 0.09]), Measured("draft", "together", [0.012]),
                    Measured("verify", "wide", verify_wide), Measured("draft", "wide", [0.01]),
                    Measured("verify", "wide", verify_wide)])                 # measured again when slow
    monkeypatch.setattr(sup, "_next_message", lambda timeout_s: next(replies))
    sup._settle_mode()
    assert sup.mode_reason.startswith("mode auto chose async: predicted")       # no restart in either case
    decision = load_decision(sup.requested_config)
    assert (decision is not None) == is_kept
    assert sup.mode_reason.endswith("(measured while something else ran: not kept)") != is_kept
    assert decision is None or decision == {"mode": "async", "reason": decision["reason"], "verify_costs_id": "verify-id"}
