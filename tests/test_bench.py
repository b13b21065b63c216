"""The serving benchmark: JSON with every figure against a running stack (gRPC and OpenAI HTTP),
and latency figures that move the way they must against a deliberately slow endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from services.bench import compare
from services.bench.__main__ import main as bench_main
from services.stack import free_port
from tests.conftest import RunningStack, start_stack

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"label", "requests", "completed", "failed", "duration_s", "request_throughput",
          "output_token_throughput", "goodput", "slo", "ttft_s", "tpot_s", "itl_s", "e2e_s", "errors"}


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory) -> RunningStack:
    http = free_port()
    running = start_stack(tmp_path_factory.mktemp("bench"), "tiny", extra={"gateway": ("--http-port", str(http))})
    running.addresses["http"] = f"http://127.0.0.1:{http}"
    yield running
    running.stack.stop()


def run_bench(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    bench_main([*argv, "--json", "--warmup", "0", "--prompt-tokens", "4:12", "--output-tokens", "6",
                "--num-requests", "6"])
    return json.loads(capsys.readouterr().out)


def test_grpc_and_openai_targets_report_every_field(tiny_stack: RunningStack, capsys) -> None:
    grpc_report = run_bench(capsys, "--grpc", tiny_stack["gateway"], "--concurrency", "3")
    http_report = run_bench(capsys, "--openai-url", tiny_stack["http"] + "/v1", "--model", "tiny-random-llama",
                            "--rates", "20,40")
    for run in grpc_report["runs"] + http_report["runs"]:
        assert FIELDS <= set(run) and run["completed"] == 6 and run["failed"] == 0, run
        assert run["output_token_throughput"] > 0 and run["ttft_s"]["p50"] > 0
        assert set(run["ttft_s"]) == {"p50", "p90", "p99", "mean"}
    assert [run["label"] for run in http_report["runs"]] == ["rate 20/s", "rate 40/s"]


def test_duration_keeps_the_load_up_across_several_gateways(tiny_stack: RunningStack, capsys) -> None:
    """--duration: the concurrency is kept up that long; --grpc with a second gateway that is down
    (nothing listens): every request goes to the serving one."""
    down = f"127.0.0.1:{free_port()}"
    bench_main(["--grpc", f"{tiny_stack['gateway']},{down}", "--concurrency", "2", "--duration", "1.5", "--json",
                "--warmup", "0", "--prompt-tokens", "4", "--output-tokens", "4", "--num-requests", "3"])
    report = json.loads(capsys.readouterr().out)
    run = report["runs"][0]
    assert run["failed"] == 0 and run["completed"] > 3 and run["duration_s"] >= 1.5, run  # cycled the 3 requests
    assert not report["terminated"]


def slow_app(first_token_delay: float, token_delay: float) -> FastAPI:
    """An OpenAI-compatible completions endpoint that is as slow as told."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict) -> StreamingResponse:
        async def events() -> Iterator[str]:
            await asyncio.sleep(first_token_delay)
            for index in range(body["max_tokens"]):
                if index:
                    await asyncio.sleep(token_delay)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': ' x'}]})}\n\n"
            usage = {"prompt_tokens": 1, "completion_tokens": body["max_tokens"], "total_tokens": 0}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return app


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


def test_latency_figures_follow_a_slow_endpoint(capsys, tmp_path: Path) -> None:
    slo = ("--slo-ttft-ms", "150", "--slo-tpot-ms", "40")
    with serving(slow_app(0.0, 0.0)) as fast_url:
        fast = run_bench(capsys, "--openai-url", fast_url, "--concurrency", "3", *slo)["runs"][0]
    with serving(slow_app(0.3, 0.06)) as slow_url:
        slow = run_bench(capsys, "--openai-url", slow_url, "--rates", "5,10", *slo, "--plot",
                         str(tmp_path / "slow.png"))["runs"][0]
    assert (tmp_path / "slow.png").stat().st_size > 10_000
    assert slow["ttft_s"]["p50"] >= 0.3 > fast["ttft_s"]["p50"]
    assert slow["tpot_s"]["p50"] >= 0.06 > fast["tpot_s"]["p50"]
    assert slow["itl_s"]["p50"] >= 0.05 and slow["e2e_s"]["p50"] > fast["e2e_s"]["p50"]
    assert slow["goodput"] == 0 < fast["goodput"]


def test_prompts_file_workload(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello there", "max_tokens": 3}\n{"prompt": "general kenobi", "max_tokens": 5}\n')
    with serving(slow_app(0.0, 0.0)) as url:
        run = run_bench(capsys, "--openai-url", url, "--prompts-file", str(prompts))["runs"][0]
    assert run["completed"] == 6 and run["output_token_throughput"] > 0


def test_advisor_follows_the_length_mix() -> None:
    from services.bench.advisor import Profile, Workload, advise

    profile = Profile({64: 800.0, 512: 700.0, 2048: 600.0}, {1: 0.04, 8: 0.09, 32: 0.15}, 46080, 0.5e9)
    long_prompts = advise(profile, Workload(rate=2.0, prompt_tokens=2000, output_tokens=32, ttft_slo_s=10,
                                            tpot_slo_s=0.2))
    long_outputs = advise(profile, Workload(rate=2.0, prompt_tokens=64, output_tokens=2000, ttft_slo_s=10,
                                            tpot_slo_s=0.2))
    assert long_prompts.disaggregate and long_prompts.prefill_workers > long_prompts.decode_workers
    assert long_outputs.decode_workers > long_prompts.decode_workers
    assert not long_outputs.disaggregate and long_outputs.prefill_workers == 0  # short prompts: unified is enough
    tight = advise(profile, Workload(rate=2.0, prompt_tokens=2000, output_tokens=32, ttft_slo_s=10,
                                     tpot_slo_s=0.05))
    assert tight.decode_batch == 1 and tight.decode_workers >= long_prompts.decode_workers


def test_compare_measures_this_stack_and_a_peer_side_by_side(tiny_stack: RunningStack) -> None:
    """make bench-compare: a fresh stack (make up's placement) and a peer (here the module's stack,
    through its OpenAI API) measured with the same workloads; ratios and HF generate in one table."""
    args = compare.parse_args(["--model", "tiny", "--peer-url", tiny_stack["http"] + "/v1", "--prompt-words", "12",
                               "--new-tokens", "6", "--repeats", "1", "--streams", "2", "--mixed-streams", "2",
                               "--mixed-prompt", "4:12", "--interference-streams", "2", "--interference-tokens", "6",
                               "--interference-interval", "0.2", "--long-prompt-words", "40"])
    columns, hf = asyncio.run(compare.run(args))
    assert [column.name for column in columns] == ["this project", "peer"]
    for column in columns:
        assert {"ttft_ms", "tpot_ms", "tokens_per_s_2", "mixed_tpot_p50_ms", "itl_p50_ms", "itl_max_ms"} \
            <= set(column.figures), column
        assert column.figures.pop("long_prompts_failed") == 0 and all(v > 0 for v in column.figures.values()), column
    assert columns[0].figures["step_ms"] > 0 and "step_ms" not in columns[1].figures and hf["tpot_ms"] > 0
    table = compare.render(columns, hf, args)
    assert "2 streams: tokens/s" in table and "decode step / HF generate per token" in table
    assert table.count("x (better)") + table.count("x (worse)") >= 7


def test_transfer_bench_prints_every_row_handoff_and_load_figure() -> None:
    """`make bench-transfer --quick`: the table's rows move the same bytes, every figure is there."""
    result = subprocess.run([sys.executable, "-m", "services.bench.transfer", "--quick", "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=280, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    rows = {row["path"]: row for row in report["rows"]}
    assert set(rows) == {"gRPC raw", "gRPC fp8", "gRPC sink", "raw TCP", "memcpy", "shm raw", "shm fp8"}
    raw = {path: row for path, row in rows.items() if "fp8" not in path}
    assert len({row["kv_bytes"] for row in raw.values()}) == 1  # the same bytes
    assert len({row["chunks"] for path, row in rows.items() if path != "shm raw"}) == 1
    assert rows["shm raw"]["chunks"] < rows["gRPC raw"]["chunks"]  # its own larger chunks (--shm-chunk-tokens)
    assert rows["gRPC fp8"]["kv_bytes"] == rows["shm fp8"]["kv_bytes"] < rows["gRPC raw"]["kv_bytes"] / 3.5
    assert all(row["seconds"] > 0 for row in rows.values())
    assert rows["shm raw"]["setup_seconds"] > 0 == rows["gRPC raw"]["setup_seconds"]  # the segment's reserve
    transports = ["gRPC raw", "gRPC fp8", "shm raw", "shm fp8"]
    assert [h["transport"] for h in report["handoffs"]] == transports
    assert all(h["handoff_seconds"] > 0 for h in report["handoffs"])
    assert [load["transport"] for load in report["under_load"]] == transports
    for load in report["under_load"]:
        assert load["transfers"] >= 1 and load["quiet_itl_p50_ms"] > 0 and load["loaded_itl_p99_ms"] > 0
    assert report["decode_prefix_hit_tokens"] == 0  # every repeat's chunks were written into the pool


def test_ingest_bench_receives_raw_and_fp8_both_ways() -> None:
    """`python -m services.bench.ingest`: the Python passes and the native pass, raw and fp8, and memcpy."""
    result = subprocess.run([sys.executable, "-m", "services.bench.ingest", "--tokens", "40", "--layers", "3",
                             "--chunk-tokens", "16", "--chunk-layers", "2", "--repeats", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["raw", "fp8"]
    assert all("Python passes" in line and "one native pass" in line for line in lines[1:3])
    assert "memcpy" in lines[3]
