"""lm-evaluation-harness, a real client, scores the model through the server (its local-completions
model: echo + logprobs for loglikelihoods, greedy generations with stop strings) exactly as its own
hf backend scores the same checkpoint in process: the short form of `make bench-eval`."""

from __future__ import annotations

from services.bench.eval import TOLERANCE, compare, run
from services.common.model_files import default_cache_dir, resolve_model_dir
from tests.conftest import RunningStack

MODEL = "SmolLM2-135M-Instruct"
DOCS = 4  # per task: 4 multiple-choice questions of 3 choices, 4 generations


def test_lm_eval_scores_through_the_server_equal_its_hf_backend(memory_stack: RunningStack) -> None:
    model_dir = resolve_model_dir("default", default_cache_dir())
    server, reference = run(memory_stack["http"] + "/v1", MODEL, model_dir, limit=DOCS, batch_size=2)
    agreement = compare(server, reference)
    assert (agreement.loglikelihoods, agreement.generations) == (3 * DOCS, DOCS)
    assert agreement.ok(TOLERANCE), agreement
    assert server.scores == reference.scores
