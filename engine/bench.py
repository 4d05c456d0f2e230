"""`amusd bench`: the paper's experiment on this machine — ar / sync / async / hf, same prompts.

    amusd bench --dataset humaneval --methods ar:1,sync:1,async,ar,sync,hf \\
        --num-samples 5 --max-new-tokens 128 --json bench.json --plot bench.png

A method string is NAME[:CORES][@BATCH]. ar and sync run on the verify worker with CORES threads
pinned to cores 0..CORES-1 (default 2 = equal resources); async always runs one worker per core
(draft on core 1, verify on core 0); hf is transformers' `generate(assistant_model=...)` in this
process with CORES threads. @BATCH (ar, sync, async): an engine with max_num_seqs BATCH gets all the
prompts at once, so the comparison with `ar` checks batch invariance on the real pair (token times
are then each stream's, not one request's alone). Mean token time = total time / total tokens, prefill included (as the paper).
Outputs that differ from the `ar` reference are reported with the first differing position and
the verify model's top-2 logit gap there (a bf16 near-tie vs a protocol bug).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import time

from tqdm import tqdm

from engine.bench_report import first_difference_gaps, machine_info, print_table, summarise, write_plot
from engine.config import EngineConfig, default_cache_dir
from engine.messages import GenerationRequest, SamplingParams
from engine.supervisor import EngineSupervisor

METHOD_NAMES = ("ar", "sync", "async", "hf")
PEER_METHOD = "peer"


def parse_method(method: str) -> tuple[str, int]:
    name, _, cores = method.partition("@")[0].partition(":")
    if name not in METHOD_NAMES:
        raise SystemExit(f"unknown method {method!r}: use {', '.join(METHOD_NAMES)} with an optional :CORES")
    if batch_of(method) > 1 and name == "hf":
        raise SystemExit(f"{method}: hf runs one request at a time")
    num_cores = int(cores) if cores else 2
    if num_cores < 1 or num_cores > (os.cpu_count() or 1):
        raise SystemExit(f"{method}: this machine has {os.cpu_count()} cores")
    return name, num_cores


def batch_of(method: str) -> int:
    """BATCH of NAME[:CORES]@BATCH (1 without it)."""
    batch = method.partition("@")[2]
    if batch and (not batch.isdigit() or int(batch) < 1):
        raise SystemExit(f"{method}: @BATCH must be a positive integer")
    return int(batch) if batch else 1


def engine_config(args, name: str, num_cores: int, batch: int = 1) -> EngineConfig:
    common = dict(verify_model=args.verify_model, draft_model=args.draft_model, dtype=args.dtype,
                  verify_quantization=args.verify_quantization, draft_quantization=args.draft_quantization,
                  decoder=args.decoder, max_model_len=args.max_model_len, num_speculative_tokens=args.k,
                  max_draft_lead=args.max_draft_lead, max_verify_tokens=args.max_verify_tokens,
                  draft_lookup_ngram=args.draft_lookup_ngram, verify_lookup_ngram=args.verify_lookup_ngram,
                  draft_vocab_size=args.draft_vocab_size,
                  sampling_scheme=args.sampling, max_num_seqs=batch, max_queue_size=max(16, args.num_samples),
                  prefill_cores=args.prefill_cores)
    if name == "async":
        return EngineConfig(mode="async", verify_cores="0", draft_cores="1", verify_threads=1, draft_threads=1, **common)
    return EngineConfig(mode=name, verify_cores=f"0-{num_cores - 1}", verify_threads=num_cores, **common)


def run_engine_method(args, name: str, num_cores: int, prompts, params: SamplingParams, batch: int = 1) -> list[dict]:
    sup = EngineSupervisor(engine_config(args, name, num_cores, batch))
    sup.start()
    request_ids = itertools.count(1)
    try:
        sup.generate(GenerationRequest(next(request_ids), prompts[0][:32], SamplingParams(max_tokens=4)))  # warm-up
        if batch > 1:                                    # all at once: each sample is one stream of the batch
            pending = [_submit(sup, next(request_ids), prompt, params) for prompt in prompts]
            return [_collect(name, *sent, args.request_timeout_s) for sent in tqdm(pending, desc=f"{name}@{batch}")]
        return [_collect(name, *_submit(sup, next(request_ids), prompt, params), args.request_timeout_s)
                for prompt in tqdm(prompts, desc=f"{name}:{num_cores}", unit="prompt")]
    finally:
        sup.shutdown()


def _submit(sup: EngineSupervisor, request_id: int, prompt, params: SamplingParams) -> tuple[queue.Queue, float]:
    results: queue.Queue = queue.Queue()
    start = time.perf_counter()
    sup.submit(GenerationRequest(request_id, prompt, SamplingParams(**vars(params))),
               lambda out: results.put((time.perf_counter(), out)))
    return results, start


def _collect(name: str, results: queue.Queue, start: float, timeout_s: float) -> dict:
    """One request's sample: its tokens, when each arrived, its stats."""
    token_ids, times = [], []
    while True:
        t, out = results.get(timeout=timeout_s)
        token_ids += out.token_ids
        times += [t - start] * len(out.token_ids)
        if out.finished:
            break
    if out.finish_reason == "error":
        raise RuntimeError(f"{name}: request failed: {out.error}")
    return {"token_ids": token_ids, "elapsed_s": t - start,                     # until its last output arrived
            "token_times_s": times, "stats": vars(out.stats)}


def run_hf_method(args, num_cores: int, prompts, params: SamplingParams) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from engine.hardware import resolve_dtype
    from engine.models import DTYPES, resolve_model_spec
    torch.set_num_threads(num_cores)
    os.sched_setaffinity(0, set(range(num_cores)))
    verify_dir, _ = resolve_model_spec(args.verify_model, default_cache_dir())
    draft_dir, _ = resolve_model_spec(args.draft_model, default_cache_dir())
    dtype = DTYPES[resolve_dtype(args.dtype, "cpu")[0]]
    verify = AutoModelForCausalLM.from_pretrained(verify_dir, dtype=dtype).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=dtype).eval()

    class TimingStreamer(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.is_prompt = True
            self.start = time.perf_counter()

        def put(self, value):
            if self.is_prompt:               # the first put() is the prompt
                self.is_prompt = False
                return
            self.times += [time.perf_counter() - self.start] * int(value.numel())

        def end(self):
            pass

    samples = []
    with torch.inference_mode():
        for prompt in tqdm(prompts, desc=f"hf:{num_cores}", unit="prompt"):
            ids = torch.tensor([prompt])
            streamer = TimingStreamer()
            out = verify.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft,
                                  max_new_tokens=params.max_tokens, do_sample=False, streamer=streamer)
            elapsed = time.perf_counter() - streamer.start
            token_ids = out[0, len(prompt):].tolist()
            samples.append({"token_ids": token_ids, "elapsed_s": elapsed,
                            "token_times_s": streamer.times[:len(token_ids)], "stats": {}})
    return samples


def run_peer_method(args, prompts, tokenizer, params: SamplingParams) -> list[dict]:
    """Another OpenAI-compatible server on the same prompts (sent as text, greedy, streamed).

    Token counts: the peer's usage.completion_tokens, else its text re-tokenized with our tokenizer.
    """
    from loadtest.peer import measure_completions
    texts = [tokenizer.decode(prompt) for prompt in prompts]
    samples = []
    for peer in tqdm(measure_completions(args.peer_url, texts, params.max_tokens, params.temperature),
                     desc=PEER_METHOD, unit="prompt"):
        token_ids = tokenizer(peer["text"], add_special_tokens=False)["input_ids"]
        num_tokens = peer["num_usage_tokens"] or len(token_ids)
        times = peer["chunk_times_s"] + [peer["elapsed_s"]] * max(0, num_tokens - len(peer["chunk_times_s"]))
        samples.append({"token_ids": token_ids[:num_tokens] + [-1] * max(0, num_tokens - len(token_ids)),
                        "elapsed_s": peer["elapsed_s"], "token_times_s": times[:num_tokens],
                        "stats": {}, "ttft_s": peer["ttft_s"]})
    return samples


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amusd bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="humaneval", help="humaneval | chat | PATH.jsonl")
    p.add_argument("--methods", default="ar:1,sync:1,async,ar,sync,hf", help="comma-separated NAME[:CORES][@BATCH]")
    p.add_argument("--num-samples", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--sampling", default="coupled", choices=["coupled", "rejection"])
    p.add_argument("--verify-model", default="default:verify")
    p.add_argument("--draft-model", default="default:draft")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32 | float64")
    p.add_argument("--verify-quantization", default="auto", help="auto | none | int8 | int8-fast | int4 | int4-mixed")
    p.add_argument("--draft-quantization", default="auto", help="auto | none | int8 | int8-fast | int4 | int4-mixed")
    p.add_argument("--decoder", default="auto", help="auto | lean | hf (engine/decoder.py)")
    p.add_argument("--k", type=int, default=0, help="tokens proposed per verify (0 = the cost model decides)")
    p.add_argument("--max-draft-lead", type=int, default=8)
    p.add_argument("--max-verify-tokens", type=int, default=8)
    p.add_argument("--draft-lookup-ngram", type=int, default=EngineConfig.draft_lookup_ngram,
                   help="async: the draft checks prompt-lookup guesses of up to this n-gram (0 = off)")
    p.add_argument("--draft-vocab-size", type=int, default=EngineConfig.draft_vocab_size,
                   help="draft: score only token ids < N plus the running prompts' ids (0 = full vocabulary)")
    p.add_argument("--verify-lookup-ngram", type=int, default=EngineConfig.verify_lookup_ngram,
                   help="async: the verify appends n-gram guesses after the draft's tokens (0 = off)")
    p.add_argument("--prefill-cores", default="auto",
                   help="cores the verify prefills on (and async batching's wide passes run on); "
                        "the verify's own cores: never wider")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--request-timeout-s", type=float, default=600)
    p.add_argument("--no-gap-check", action="store_true", help="skip the top-2 logit gap of differing outputs")
    p.add_argument("--peer-url", default=None,
                   help="also measure this OpenAI-compatible server (e.g. llama-server) on the same prompts, "
                        "as method 'peer'")
    p.add_argument("--json", default="bench.json", help="output JSON path")
    p.add_argument("--plot", default=None, help="output PNG: tokens over time per method (paper's Figure 4)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    parsed = {m: parse_method(m) for m in methods}
    from transformers import AutoTokenizer

    from engine.bench_data import load_prompts
    from engine.models import resolve_model_spec
    verify_dir, _ = resolve_model_spec(args.verify_model, default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(verify_dir)
    prompts = load_prompts(args.dataset, tokenizer, args.num_samples)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                            seed=args.seed if args.temperature > 0 else None)
    raw = {}
    if args.peer_url:
        raw[PEER_METHOD] = run_peer_method(args, prompts, tokenizer, params)
        parsed[PEER_METHOD] = (PEER_METHOD, 0)
    for method, (name, num_cores) in parsed.items():
        if name == PEER_METHOD:
            continue
        if name == "hf":
            raw[method] = run_hf_method(args, num_cores, prompts, params)
        else:
            raw[method] = run_engine_method(args, name, num_cores, prompts, params, batch_of(method))
    reference = next((m for m in methods if parsed[m][0] == "ar"), None)
    report = {"machine": machine_info(), "args": vars(args), "reference": reference,
              "methods": summarise(raw, parsed, reference)}
    if reference and not args.no_gap_check and args.temperature == 0:
        first_difference_gaps(report, raw, reference, prompts, verify_dir, args.dtype, args.verify_quantization)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    if args.plot:
        write_plot(raw, args.plot)
    print(f"wrote {args.json}" + (f" and {args.plot}" if args.plot else ""))
    return 0
