"""`python -m simulator` / `batchgate-simulator`: serve the simulator with uvicorn."""

from __future__ import annotations

import argparse

import uvicorn

from simulator.app import create_app
from simulator.config import SimulatorConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="An OpenAI-compatible upstream with injectable latency and faults.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency-ms", type=float)
    parser.add_argument("--jitter-ms", type=float)
    parser.add_argument("--error-rate", type=float)
    parser.add_argument("--rate-429", type=float)
    parser.add_argument("--retry-after-s", type=float)
    parser.add_argument("--max-rpm", type=int)
    parser.add_argument("--api-key")
    parser.add_argument("--seed", type=int)
    args = vars(parser.parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    config = SimulatorConfig.from_env(**args)
    print(f"simulator listening on http://{host}:{port}", flush=True)
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
