"""`make bench-eval`: lm-evaluation-harness scores the model through this server and in process, on
the same data in the same run, and the two must agree.

Two small local tasks (JSON lines in services/bench/eval_data, nothing downloaded): a multiple-choice
task scored by loglikelihood (lm-eval's `local-completions` sends `echo` + `logprobs: 1` +
`max_tokens: 1` and sums the prompt tokens' log-probabilities) and a `generate_until` task (greedy,
stop at a newline). The server run uses lm-eval's `local-completions` model against the HTTP API;
the reference uses lm-eval's own `hf` backend on the same checkpoint. Printed: each task's score
from both, the largest difference of a per-choice loglikelihood, and how many greedy flags and
generations differ. Exits 1 if a score, a greedy flag or a generation differs, or a loglikelihood
differs by more than --tolerance.

    python -m services.bench.eval                      # starts a stack on free ports
    python -m services.bench.eval --url http://127.0.0.1:8000/v1 --limit 5
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.common.model_files import default_cache_dir, resolve_model_dir
from services.stack import Stack, free_port, local_stack

DATA = Path(__file__).parent / "eval_data"
TOLERANCE = 1e-3  # per-choice loglikelihood, summed over a few tokens (the decode is exact; see below)


def task_configs(limit_tokens: int = 8) -> list[dict[str, Any]]:
    """The two tasks as lm-eval task configs (dicts: the data paths are absolute)."""
    def local(name: str) -> dict[str, Any]:
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(DATA / name)}},
                "test_split": "test"}

    return [
        {"task": "disagg_facts_mc", **local("facts_mc.jsonl"), "output_type": "multiple_choice",
         "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
         "metric_list": [{"metric": "acc"}]},
        {"task": "disagg_questions_gen", **local("questions_gen.jsonl"), "output_type": "generate_until",
         "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
         "generation_kwargs": {"until": ["\n"], "max_gen_toks": limit_tokens, "do_sample": False,
                               "temperature": 0.0},
         "metric_list": [{"metric": "exact_match", "ignore_case": True, "ignore_punctuation": True,
                          "regexes_to_ignore": [" "]}]},
    ]


@dataclass(frozen=True, slots=True)
class Run:
    scores: dict[str, float]  # task -> its main metric
    samples: dict[str, list[dict[str, Any]]]  # task -> lm-eval's logged samples, in doc order


def evaluate(model: str, model_args: Mapping[str, Any], limit: int | None, batch_size: int) -> Run:
    import lm_eval  # noqa: PLC0415 - optional dependency (requirements-eval.txt)
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    results = lm_eval.simple_evaluate(model=model, model_args=dict(model_args), tasks=task_configs(),
                                      task_manager=TaskManager(), limit=limit, batch_size=batch_size,
                                      log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    scores = {task: _main_metric(values) for task, values in results["results"].items()}
    samples = {task: sorted(docs, key=lambda d: d["doc_id"]) for task, docs in results["samples"].items()}
    return Run(scores, samples)


def _main_metric(values: Mapping[str, Any]) -> float:
    for key in ("acc,none", "exact_match,none"):
        if key in values:
            return float(values[key])
    raise KeyError(f"no acc or exact_match in {sorted(values)}")


@dataclass(frozen=True, slots=True)
class Agreement:
    max_loglikelihood_diff: float
    greedy_flags_differ: int
    generations_differ: int
    loglikelihoods: int
    generations: int

    def ok(self, tolerance: float) -> bool:
        return (self.max_loglikelihood_diff <= tolerance and not self.greedy_flags_differ
                and not self.generations_differ)


def compare(server: Run, reference: Run) -> Agreement:
    """Sample by sample: loglikelihood responses are [(logprob, is_greedy)] per choice; generation
    responses one string."""
    diff, flags, generations, scored, generated = 0.0, 0, 0, 0, 0
    for task, docs in reference.samples.items():
        for ours, theirs in zip(server.samples[task], docs, strict=True):
            for mine, ref in zip(ours["resps"], theirs["resps"], strict=True):
                if isinstance(ref[0], str):
                    generated += 1
                    generations += mine[0] != ref[0]
                else:
                    scored += 1
                    diff = max(diff, abs(float(mine[0][0]) - float(ref[0][0])))
                    flags += bool(mine[0][1]) != bool(ref[0][1])
    return Agreement(diff, flags, generations, scored, generated)


def report(server: Run, reference: Run, agreement: Agreement) -> str:
    lines = ["lm-eval: the model through this server (local-completions) vs in process (hf), same data, same run",
             f"  {'task':24} {'server':>8} {'hf':>8}"]
    lines += [f"  {task:24} {server.scores[task]:8.4f} {reference.scores.get(task, math.nan):8.4f}"
              for task in sorted(server.scores)]
    lines.append(f"  loglikelihoods compared: {agreement.loglikelihoods}, largest difference "
                 f"{agreement.max_loglikelihood_diff:.2e}; greedy flags differing: {agreement.greedy_flags_differ}")
    lines.append(f"  generations compared: {agreement.generations}, differing: {agreement.generations_differ}")
    return "\n".join(lines)


def run(url: str, served_model: str, model_dir: Path, limit: int | None, batch_size: int) -> tuple[Run, Run]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    server = evaluate("local-completions", {
        "model": served_model, "base_url": f"{url}/completions", "tokenizer_backend": "huggingface",
        "tokenizer": str(model_dir), "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1,
        "timeout": 300}, limit, batch_size)
    reference = evaluate("hf", {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"}, limit, 1)
    return server, reference


def _served_model(url: str) -> str:
    import httpx  # noqa: PLC0415

    return str(httpx.get(f"{url}/models", timeout=30).json()["data"][0]["id"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="",
                        help="an OpenAI-compatible /v1 URL of this server (default: start a stack)")
    parser.add_argument("--model", default="default", help="the checkpoint the stack and the hf reference load")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per completions request")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest loglikelihood difference allowed")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model_dir = resolve_model_dir(args.model, default_cache_dir())
    stack = None
    url = args.url.rstrip("/")
    if not url:
        ports = {name: free_port() for name in ("gateway", "prefill", "decode", "kvstore", "http")}
        stack = Stack(local_stack(ports, args.model, log_level="WARNING"),
                      log_dir=tempfile.mkdtemp(prefix="bench-eval-"))
        stack.start()
        url = f"http://127.0.0.1:{ports['http']}/v1"
    try:
        if stack is not None:
            stack.wait_healthy(timeout=600)
        server, reference = run(url, _served_model(url), model_dir, args.limit, args.batch_size)
    finally:
        if stack is not None:
            stack.stop()
    agreement = compare(server, reference)
    print(report(server, reference, agreement))  # noqa: T201 - the benchmark's output
    if args.json:
        Path(args.json).write_text(json.dumps({"server": server.scores, "hf": reference.scores,
                                               "agreement": asdict(agreement)}, indent=2))
    return 0 if agreement.ok(args.tolerance) and server.scores == reference.scores else 1


if __name__ == "__main__":
    sys.exit(main())
