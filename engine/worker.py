"""Worker process entry: one process per role ("verify" or "draft"), models loaded once.

    supervisor --cmd_queue (StartRequest | CancelRequest | Shutdown | Measure, MeasureStop)--> worker
    worker --out_conn, a pipe of its own (WorkerReady | TokensOut | RequestDone | WorkerFailed)--> supervisor
    worker <--SharedState (shared memory)--> other worker

The verify worker runs every mode (`ar`, `sync` with the draft model loaded beside the verify
model, and the verify half of `async`); the draft worker exists only in `async` mode.
A worker pins itself to its CPU cores and thread count, dies with its parent (PR_SET_PDEATHSIG),
beats a heartbeat while idle and while decoding, and reports its own failure before exiting.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import signal
import sys
import time
import traceback

from engine.config import ConfigError, EngineConfig
from engine.messages import (CancelRequest, Measure, Measured, MeasureStop, PassCosts, RequestDone, Shutdown,
                             StartRequest, WorkerFailed, WorkerReady)
from engine.shared_state import HEARTBEAT_OF, Clock, SharedState, VerifySide

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent_pid:         # parent died before prctl took effect
        os._exit(1)


def _place(config: EngineConfig, role: str) -> None:
    import torch
    cores = config.cores_of(role)
    device = config.model_settings(role).device
    if cores and device == "cpu" and hasattr(os, "sched_setaffinity"):
        available = os.sched_getaffinity(0)
        wanted = {c for c in cores if c in available} or available
        os.sched_setaffinity(0, wanted)
    threads = config.threads_of(role)
    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))


def worker_main(role: str, config: EngineConfig, shm_name: str, cmd_queue, out_conn, peer_conn,
                parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the supervisor decides when we stop
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s amusd.{role}: %(message)s")
    request_id = None
    try:
        _place(config, role)
        state = SharedState.attach(shm_name, config.max_model_len)
        worker = {"verify": VerifyWorker, "draft": DraftWorker}[role](config, state, peer_conn)
        out_conn.send(worker.ready_message())
        while True:
            state.beat(HEARTBEAT_OF[role])
            try:               # a batching worker with requests running only looks: it has steps to run
                msg = cmd_queue.get_nowait() if worker.is_busy else cmd_queue.get(timeout=0.1)
            except queue.Empty:
                msg = None
            if isinstance(msg, Shutdown):
                break
            if isinstance(msg, StartRequest):
                request_id = msg.request_id
                worker.run(msg, out_conn.send)          # batching: the request joins the batch, run returns
                request_id = None
            elif isinstance(msg, CancelRequest) and worker.is_busy:
                worker.batch.cancel(msg.request_id)
            elif isinstance(msg, PassCosts):
                worker.use_pass_costs(msg)
            elif isinstance(msg, Measure):
                with _placement(config, msg.placement):
                    seconds = worker.measure(msg.placement, lambda: _is_stop_sent(cmd_queue))
                out_conn.send(Measured(role, msg.placement, list(seconds)))
            if msg is None and worker.is_busy:          # every waiting command first, then one step
                worker.batch.step(out_conn.send)
    except BaseException as exc:  # noqa: BLE001 - report everything, then exit non-zero
        try:
            out_conn.send(WorkerFailed(role, request_id, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except OSError:
            pass                  # the supervisor is gone: nobody to tell
        out_conn.close()
        sys.exit(1)


class VerifyWorker:
    def __init__(self, config: EngineConfig, state: SharedState, peer_conn):
        from engine.cost_model import SpeculationBudget
        from engine.decoding import Verifier
        from engine.logits_processors import LazyGrammarFactory
        from engine.model_loader import load_model
        from engine.models import check_same_vocab, eos_token_ids_of, resolve_model_spec
        from engine.token_channel import HostDraftChannel
        start = time.perf_counter()
        self.config, self.state = config, state
        verify = load_model("verify", config, config.verify_device, config.max_verify_tokens + 1)
        model, path = verify.runner.model, verify.model_dir
        self.model_dir = path
        self.runtime = verify.runtime
        self.eos_token_ids = eos_token_ids_of(model)
        self.drafter = None
        draft_costs = None
        if config.mode != "ar":
            draft_path, draft_gguf = resolve_model_spec(config.draft_model, config.cache_dir, config.draft_gguf_file)
            if config.mode == "sync":
                draft = load_model("draft", config, config.verify_device, 1, worker_role="verify")
                self.drafter, draft_model, draft_costs = draft.runner, draft.runner.model, draft.costs
                self.runtime = {**self.runtime, "sync_draft": draft.runtime}
            else:
                draft_model = _meta_shape_model(draft_path, draft_gguf)
            check_same_vocab(model, draft_model, path, draft_path)
        budget = SpeculationBudget(verify.costs, config.max_verify_tokens, config.num_speculative_tokens,
                                   draft_costs, config.acceptance_prior)
        self.verifier = Verifier(verify.runner, budget)
        self.make_grammar = LazyGrammarFactory(path, verify.runner.vocab_size)
        prefill_cores = config.verify_prefill_cores
        if prefill_cores and set(prefill_cores) != set(config.cores_of("verify") or ()):
            from engine.models import PrefillPlacement
            verify.runner.prefill_placement = PrefillPlacement(prefill_cores)
        # The verify reads draft tokens from host memory whatever the draft's device (engine/token_channel.py).
        self.channel = HostDraftChannel(state, _share_draft_probs(config, peer_conn, "verify", 0))
        self.batch = None                         # max_num_seqs > 1: engine/batch_decode.py
        self.shared_drafts = None                 # async batching: the rows' drafts (engine/async_batch.py)
        if config.mode in ("ar", "sync") and config.max_num_seqs > 1:
            from engine.batch_decode import batch_decoder_for
            try:
                self.batch = batch_decoder_for(self.verifier, config, self.drafter)
            except ValueError as exc:
                logging.getLogger("amusd.verify").warning("max_num_seqs %d: %s; decoding one request at a time",
                                                          config.max_num_seqs, exc)
        elif config.is_async_batched:             # the draft worker batches the same rows: no fallback
            from engine.async_batch import SharedDrafts
            from engine.batch_decode import batch_decoder_for
            from engine.kv_budget import kv_bytes_per_token
            shape = draft_model.config
            draft_kv = kv_bytes_per_token(shape.num_hidden_layers, shape.num_key_value_heads,
                                          getattr(shape, "head_dim", None) or shape.hidden_size // shape.num_attention_heads,
                                          verify.runner.decoder.dtype.itemsize)
            wide = verify.runner.prefill_placement             # the draft's cores too (None: no wide passes)
            self.shared_drafts = SharedDrafts(state, config.max_verify_tokens + 1, config.verify_lookup_ngram, wide)
            try:
                self.batch = batch_decoder_for(self.verifier, config, shared_drafts=self.shared_drafts,
                                               draft_kv_bytes_per_token=draft_kv)
            except ValueError as exc:
                raise ConfigError(f"mode async with max_num_seqs {config.max_num_seqs}: {exc}; "
                                  "set max_num_seqs: 1 (or mode: ar) for this model") from exc
        if self.batch is not None:
            self.runtime = {**self.runtime, **self.batch.kv_budget.as_runtime()}
        self.runtime = {**self.runtime, "max_num_seqs": self.batch.max_num_seqs if self.batch else 1}
        self.load_seconds = time.perf_counter() - start

    @property
    def is_busy(self) -> bool:
        return self.batch is not None and self.batch.is_busy

    def use_pass_costs(self, msg: PassCosts) -> None:
        """Async batching: the costs each pass decides wide or beside the draft with (engine/async_batch.py)."""
        from engine.cost_model import ForwardCosts
        if self.shared_drafts is not None:
            self.shared_drafts.use_costs(*(ForwardCosts(tuple(c)) for c in (msg.narrow, msg.wide, msg.draft)))

    def measure(self, placement: str, should_stop) -> tuple[float, ...]:
        """c(1..K) again (`mode: auto`, engine/mode_auto.py); the draft keeps running meanwhile when "together"."""
        from engine.calibration import measure_forward_costs
        return measure_forward_costs(self.verifier.runner, self.config.max_verify_tokens + 1).seconds

    def ready_message(self) -> WorkerReady:
        return WorkerReady("verify", os.getpid(), self.verifier.runner.vocab_size, self.eos_token_ids,
                           self.load_seconds, self.model_dir, self.runtime)

    def run(self, req: StartRequest, emit) -> None:
        from engine.decoding import new_sequence, run_decode
        state, config = self.state, self.config
        start = time.perf_counter()
        seq = new_sequence(req, self.eos_token_ids, config.max_model_len, config.sampling_scheme, self.make_grammar)
        if self.batch is not None:
            self.batch.admit(seq)
            return
        side = VerifySide(state)

        def should_stop() -> bool:
            state.beat(Clock.VERIFY_HEARTBEAT)
            return side.is_cancelled(req.request_id)

        run_decode(seq, self.verifier, self._proposer(side), emit, should_stop)
        seq.stats.num_passes_by_batch_size = [seq.stats.num_verify_steps]      # one sequence in every pass
        seq.stats.total_s = time.perf_counter() - start
        emit(RequestDone(req.request_id, seq.finish_reason or "stop", seq.stats))

    def _proposer(self, side: VerifySide):
        """What each verify step checks: nothing (ar), the local draft (sync), the draft worker's tokens (async)."""
        from engine.async_decode import SharedDraftProposer
        from engine.proposers import LocalDraftProposer, NgramGuesses, NoProposer
        if self.config.mode == "ar":
            return NoProposer()
        if self.config.mode == "sync":
            return LocalDraftProposer(self.drafter)
        proposer = SharedDraftProposer(side, self.channel, self.verifier.prefills_wide)
        return NgramGuesses(proposer, self.config.verify_lookup_ngram) if self.config.verify_lookup_ngram else proposer


class DraftWorker:
    def __init__(self, config: EngineConfig, state: SharedState, peer_conn):
        from engine.async_decode import Drafter
        from engine.logits_processors import LazyGrammarFactory
        from engine.model_loader import load_model
        from engine.models import eos_token_ids_of
        start = time.perf_counter()
        self.config = config
        draft = load_model("draft", config, config.draft_device, 1 + min(config.max_draft_lead, 4))
        self.model_dir, self.runtime, runner = draft.model_dir, draft.runtime, draft.runner
        self.batch = None                         # async with max_num_seqs > 1: engine/async_batch.py
        if config.is_async_batched:
            from engine.async_batch import AsyncBatchDrafter
            self.batch = AsyncBatchDrafter(runner, state, config.max_draft_lead, config.max_model_len,
                                           config.prefill_chunk_tokens, config.max_num_batched_tokens,
                                           config.step_timeout_s, eos_token_ids_of(runner.model),
                                           LazyGrammarFactory(draft.model_dir, runner.vocab_size))
        channel = _draft_channel(config, state, _share_draft_probs(config, peer_conn, "draft", runner.vocab_size))
        self.drafter = Drafter(runner, state, channel, config.max_draft_lead, config.max_model_len,
                               wait_timeout_s=config.step_timeout_s,
                               lookup_ngram=0 if config.draft_device.startswith("cuda") else config.draft_lookup_ngram,
                               scheme=config.sampling_scheme,
                               eos_token_ids=eos_token_ids_of(runner.model),
                               make_grammar=LazyGrammarFactory(draft.model_dir, runner.vocab_size))
        self.load_seconds = time.perf_counter() - start

    @property
    def is_busy(self) -> bool:
        return self.batch is not None and self.batch.is_busy

    def measure(self, placement: str, should_stop) -> tuple[float, ...]:
        """c(1) again (`mode: auto`); "together": one-token forwards until the supervisor says stop,
        so that the verify measures under this worker's load for as long as it takes."""
        from engine.calibration import measure_forward_costs, measure_one_token_until
        if placement == "wide":
            return measure_forward_costs(self.drafter.runner, 1).seconds
        return measure_one_token_until(self.drafter.runner, should_stop, self.config.step_timeout_s).seconds

    def ready_message(self) -> WorkerReady:
        return WorkerReady("draft", os.getpid(), self.drafter.runner.vocab_size, [], self.load_seconds, self.model_dir,
                           self.runtime)

    def run(self, req: StartRequest, emit) -> None:
        if self.batch is not None:
            self.batch.add(req)                   # it starts once the verify puts it in a row
            return
        self.drafter.run(req)


def _placement(config: EngineConfig, placement: str):
    """"wide": this thread on the cores `ar` would give the verify worker (both workers' cores on CPU)."""
    cores = config.replace(mode="ar").cores_of("verify")
    if placement != "wide" or not cores or not hasattr(os, "sched_setaffinity"):
        return contextlib.nullcontext()
    from engine.models import PrefillPlacement
    return PrefillPlacement(cores).widened()


def _is_stop_sent(cmd_queue) -> bool:
    """A MeasureStop (or anything else: a Shutdown is put back for the main loop) is waiting."""
    try:
        msg = cmd_queue.get_nowait()
    except queue.Empty:
        return False
    if not isinstance(msg, MeasureStop):
        cmd_queue.put(msg)
    return True


def _meta_shape_model(path: str, gguf: str | None):
    """The draft's output-embedding shape without loading its weights (async verify only needs it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(path, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _draft_channel(config: EngineConfig, state: SharedState, draft_probs):
    """CPU draft: stores straight into shared memory. CUDA draft: event-ordered copies through a
    pinned host ring, so neither side waits on the GPU per token."""
    from engine.token_channel import CudaDraftChannel, HostDraftChannel
    if not config.draft_device.startswith("cuda"):
        return HostDraftChannel(state, draft_probs)
    return CudaDraftChannel(state, draft_probs, ring_size=config.max_draft_lead + 2)


def _share_draft_probs(config: EngineConfig, peer_conn, role: str, vocab_size: int):
    """Async rejection sampling: the draft's q rows travel in a [max_draft_lead + 1, V] ring in host
    shared memory (also for a CUDA draft: see engine/token_channel.py).

    Created by the draft worker (vocab_size: its rows) and sent to the verify worker over the peer
    pipe, the workers' only start-up handshake; None in every other configuration.
    """
    if config.mode != "async" or config.sampling_scheme != "rejection":
        return None
    import torch
    import torch.multiprocessing  # noqa: F401 - registers the shared-tensor reductions for the pipe
    if role == "draft":
        ring = torch.zeros(config.max_draft_lead + 1, vocab_size, dtype=torch.float32).share_memory_()
        peer_conn.send(ring)
        return ring
    if not peer_conn.poll(config.worker_start_timeout_s):
        raise TimeoutError("draft worker never sent its probability ring")
    return peer_conn.recv()
