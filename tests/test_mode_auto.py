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
    assert [m.placement for m in workers["verify"].cmd_queue] == ["together", "wide"]
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
