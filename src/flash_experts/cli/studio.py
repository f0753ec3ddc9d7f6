"""`flash-experts studio MODEL [MODEL ...]`: a local page that shows the experts and the attention at work.

    flash-experts studio runs/demo/moe/best smollm2 --run runs/demo/moe
    # then open http://127.0.0.1:7860/

Generate (tokens coloured by the expert their router chose, router probabilities on click, tokens x layers
grid), Compare two models on one prompt and seed, Attention heatmaps per layer and head with the measured
peak memory of our flash attention against eager attention, Runs (loss curves, expert load). Served on
127.0.0.1 only, unless --host says otherwise; it reads only the models and run folders named here, and
fetches nothing from the internet. Needs the studio extra: pip install -e ".[studio]".
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "studio",
        help="a local web page: experts per token, router probabilities, attention heatmaps, runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("models", metavar="MODEL", nargs="+", help="checkpoint folders, hub ids or 'smollm2'")
    parser.add_argument("--run", action="append", default=[], metavar="RUN_DIR",
                        help="a training run folder (metrics.jsonl) for the Runs tab; repeatable")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util
    import socket
    from pathlib import Path

    from flash_experts.errors import UserError

    # The arguments first: a mistyped one is said the same way whether or not the studio extra is installed.
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    for run_dir in args.run:
        if not (Path(run_dir) / "metrics.jsonl").is_file():
            raise UserError(f"--run {run_dir}: no metrics.jsonl there (a training run folder has one)")
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise UserError('the studio needs FastAPI and uvicorn: pip install -e ".[studio]"')
    with socket.socket() as probe:  # a clear line now rather than uvicorn's traceback later
        try:
            probe.bind((args.host, args.port))
        except OSError as error:
            raise UserError(f"cannot serve on {args.host}:{args.port}: {error.strerror or error}") from None
    from flash_experts.studio.app import serve

    serve(args.models, args.run, args.host, args.port, args.device)
    return 0
