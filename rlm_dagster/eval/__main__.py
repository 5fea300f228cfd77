"""``python -m rlm_dagster.eval``: run the eval suite and print one table.

    python -m rlm_dagster.eval --base-url http://127.0.0.1:8089 --root-model smollm2 \\
        --sub-model smollm2 --suite small --budget-usd 2 --out eval-results
    python -m rlm_dagster.eval --fake --out /tmp/eval   # the harness on its scripted fake

Progress goes to stderr, the table to stdout; ``results.json`` and ``results.md`` to
``--out``. The API key is read from ``ANTHROPIC_API_KEY`` (a server on loopback needs none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from rlm_dagster.errors import ConfigError, RLMError
from rlm_dagster.eval.fake import fake_endpoint
from rlm_dagster.eval.runner import SuiteConfig, run_suite
from rlm_dagster.eval.strategies import STRATEGIES
from rlm_dagster.eval.suite import FAMILIES, SUITES


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rlm_dagster.eval",
        description="Run rlm_dagster's eval suite (rlm vs direct vs tools) against an "
        "Anthropic-compatible endpoint and print one table.",
    )
    p.add_argument(
        "--base-url",
        default=os.environ.get("ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
        help="Anthropic-compatible endpoint (default: $ANTHROPIC_BASE_URL or the Anthropic API)",
    )
    p.add_argument("--root-model", default=os.environ.get("RLM_ROOT_MODEL", "claude-sonnet-5-5"))
    p.add_argument("--sub-model", default=os.environ.get("RLM_SUB_MODEL", "claude-haiku-5-5"))
    p.add_argument("--suite", choices=sorted(SUITES), default="small")
    p.add_argument(
        "--tasks",
        type=_csv,
        default=FAMILIES,
        help=f"task families, comma-separated (default: all of {','.join(FAMILIES)})",
    )
    p.add_argument(
        "--strategies",
        type=_csv,
        default=tuple(STRATEGIES),
        help="comma-separated, of rlm,direct,tools (default: all three)",
    )
    p.add_argument(
        "--budget-usd",
        type=float,
        default=10.0,
        help="the whole suite's budget: no question starts unless one question's cap fits",
    )
    p.add_argument("--max-cost-usd", type=float, default=1.0, help="per question and strategy")
    p.add_argument("--max-iterations", type=int, default=12, help="root turns per question")
    p.add_argument("--max-sub-calls", type=int, default=500, help="per question")
    p.add_argument("--max-wall-time-s", type=float, default=900.0, help="per question")
    p.add_argument(
        "--root-thinking",
        choices=("off", "auto"),
        default="off",
        help="up-front thinking of the root, for every strategy (tools needs off)",
    )
    p.add_argument(
        "--model-profiles",
        type=json.loads,
        default={},
        help='JSON, as RLMResource(model_profiles=...): e.g. \'{"smollm2": {"tools": true, '
        '"context_window": 8192, "input_usd_per_mtok": 0, "output_usd_per_mtok": 0}}\'',
    )
    p.add_argument("--out", type=Path, default=Path("eval-results"))
    p.add_argument("--cache", default=None, help="call cache (default: <out>/cache.sqlite3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=None, help="the repo's data/ folder")
    p.add_argument("--sandbox", default="auto", help="REPL worker isolation (rlm strategy)")
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument(
        "--fake",
        action="store_true",
        help="run against the built-in scripted fake (a harness check; its numbers are not "
        "results)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    key = os.environ.get("ANTHROPIC_API_KEY") or None
    host = urlsplit(args.base_url).hostname or ""
    if key is None and not args.fake and host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"error: {args.base_url} needs an API key: set ANTHROPIC_API_KEY (a local server "
            "on 127.0.0.1 needs none), or try the harness with --fake.",
            file=sys.stderr,
        )
        return 2
    config = SuiteConfig(
        base_url=args.base_url,
        root_model=args.root_model,
        sub_model=args.sub_model,
        api_key=key,
        suite=args.suite,
        families=tuple(args.tasks),
        strategies=tuple(args.strategies),
        seed=args.seed,
        budget_usd=args.budget_usd,
        max_cost_usd=args.max_cost_usd,
        max_iterations=args.max_iterations,
        max_sub_calls=args.max_sub_calls,
        max_wall_time_s=args.max_wall_time_s,
        root_thinking=args.root_thinking,
        max_concurrency=args.max_concurrency,
        model_profiles=args.model_profiles,
        out=args.out,
        cache_path=args.cache,
        data_dir=args.data_dir,
        sandbox=args.sandbox,
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    try:
        if args.fake:
            with fake_endpoint(config) as (ready, tasks):
                report = run_suite(ready, tasks=tasks, log=log)
        else:
            report = run_suite(config, log=log)
    except (ConfigError, RLMError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'results.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
