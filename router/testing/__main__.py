"""``python -m router.testing --port N``: a fake upstream in the foreground until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence

from router.testing.fake import Behavior, FakeUpstream


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a fake upstream in the foreground until SIGTERM or Ctrl-C; print its URL first."""
    parser = argparse.ArgumentParser(prog="python -m router.testing",
                                     description="a scripted fake OpenAI-compatible server")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--chunks", type=int, default=5, help="content chunks per answer")
    parser.add_argument("--chunk-delay-s", type=float, default=0.0, help="seconds before each chunk")
    parser.add_argument("--delay-before-headers-s", type=float, default=0.0,
                        help="seconds before the response headers of each answer")
    parser.add_argument("--model", action="append", help="model id listed by /v1/models (repeatable)")
    parser.add_argument("--status", type=int, default=200,
                        help="answer every request (the model list too) with this status and an OpenAI error")
    parser.add_argument("--hang", action="store_true",
                        help="accept connections but never answer (inference and the model list)")
    args = parser.parse_args(argv)
    default = Behavior(status=args.status, chunks=args.chunks, chunk_delay_s=args.chunk_delay_s, hang=args.hang,
                       delay_before_headers_s=args.delay_before_headers_s)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with FakeUpstream("fake", default=default, port=args.port, models=args.model or ("fake-model",)) as fake:
        fake.models_status = args.status
        fake.models_hang = args.hang
        print(fake.url, flush=True)
        done.wait()


if __name__ == "__main__":
    main()
