"""`python -m services.client [--max-tokens N] [--temperature T] [--chat] "PROMPT"`: print the
generated text as it streams."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from services.client import GatewayClient, GatewayError, LogitControls
from services.common.tls_settings import add_tls_arguments, sdk_tls_options


def _bias(value: str) -> tuple[int, float]:
    token, equals, bias = value.partition("=")
    try:
        if equals:
            return int(token), float(bias)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected ID=BIAS, such as 42=-5, got {value!r}")


def _function(value: str) -> dict[str, Any]:
    """An OpenAI function object given as JSON text, or @path of a file holding it."""
    try:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        function = json.loads(text)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"expected a function as JSON or @file: {error}") from None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise argparse.ArgumentTypeError("a function needs at least a \"name\"")
    return function


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.client", description=__doc__)
    parser.add_argument("prompt", help="text to complete (or the user message with --chat)")
    parser.add_argument("--address", default=os.environ.get("GATEWAY_ADDRESS", "127.0.0.1:50051"),
                        help="gateway host:port, or several comma separated (round robin over the serving ones) "
                        "[env GATEWAY_ADDRESS]")
    parser.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--presence-penalty", type=float, default=None, help="in [-2, 2]")
    parser.add_argument("--frequency-penalty", type=float, default=None, help="in [-2, 2]")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="in (0, 10]; 1 is none")
    parser.add_argument("--min-p", type=float, default=None, help="in [0, 1]")
    parser.add_argument("--min-tokens", type=int, default=0, help="no end of sequence before this many tokens")
    parser.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    parser.add_argument("--logit-bias", type=_bias, action="append", default=[], metavar="ID=BIAS",
                        help="add BIAS in [-100, 100] to token ID's logit (repeatable)")
    parser.add_argument("--chat", action="store_true", help="send PROMPT as a user message with the chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--api-key", default=os.environ.get("GATEWAY_API_KEY"),
                        help="API key, when the gateway requires one [env GATEWAY_API_KEY]")
    parser.add_argument("--timeout", type=float, default=None, help="deadline of the whole call, in seconds")
    parser.add_argument("--usage", action="store_true", help="print token usage at the end (stderr)")
    parser.add_argument("--logprobs", type=int, default=None, metavar="N",
                        help="print each token's log-probability and its N most likely alternatives (stderr)")
    parser.add_argument("--n", type=int, default=None, help="choices to generate (printed one after another)")
    parser.add_argument("--best-of", type=int, default=0, help="generate this many choices, print the --n best")
    parser.add_argument("--tool", type=_function, action="append", default=[], metavar="JSON",
                        help="with --chat: a function the model may call, as OpenAI's function object "
                             "(name, description, parameters) in JSON or @file (repeatable)")
    parser.add_argument("--tool-choice", default="", help="auto (default), none, required, or a function's name")
    add_tls_arguments(parser)
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    controls = LogitControls(args.presence_penalty, args.frequency_penalty, args.repetition_penalty, args.min_p,
                             dict(args.logit_bias), args.min_tokens, args.stop_token_id)
    options = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, stop=args.stop, controls=controls, logprobs=args.logprobs, n=args.n,
                   best_of=args.best_of, tools=args.tool, tool_choice=args.tool_choice)
    messages = None
    if args.chat:
        messages = ([("system", args.system)] if args.system else []) + [("user", args.prompt)]
    async with GatewayClient(args.address, api_key=args.api_key, timeout_seconds=args.timeout,
                             **sdk_tls_options(args)) as client:
        try:
            if (args.n or 1) > 1 or args.best_of:
                for index, choice in enumerate(await client.choices(None if args.chat else args.prompt,
                                                                    messages=messages, **options)):
                    print(f"--- choice {index} [{choice.finish_reason}] ---\n{choice.text}")
                return 0
            async for chunk in client.generate(None if args.chat else args.prompt, messages=messages, **options):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                for entry in chunk.logprobs:
                    alternatives = " ".join(f"{token}:{value:.3f}" for token, value in entry.top)
                    print(f"\n[token {entry.token_id} logprob {entry.logprob:.4f} rank {entry.rank}] {alternatives}",
                          file=sys.stderr)
                for call in chunk.tool_calls:
                    print(f"\n[tool call {call.id}] {call.name}({call.arguments})")
                if chunk.usage and args.usage:
                    print(f"\n[{chunk.finish_reason}] prompt {chunk.usage.prompt_tokens} + completion "
                          f"{chunk.usage.completion_tokens} tokens", file=sys.stderr)
        except GatewayError as error:
            print(f"\nerror: {error}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    return 0


def main() -> None:
    sys.exit(asyncio.run(run(parse_args())))


if __name__ == "__main__":
    main()
