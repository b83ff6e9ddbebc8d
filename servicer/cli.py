"""`vlm-servicer`: serve a model, or build the random-weight tiny checkpoint.

vlm-servicer serve [--model PATH] [servicer flags] [vLLM engine flags ...]
vlm-servicer build-tiny-model [--out DIR]
"""

import argparse
import logging
import pathlib
import sys

import uvloop

from servicer.config import DEFAULT_MODEL, RANDOM_MODEL, ConfigError, add_serve_flags, config_from_args


def _ensure_tiny_model(model: str) -> None:
    """The random tiny model is built on first use; the trained default is committed."""
    path = pathlib.Path(model)
    if (path / "RECIPE").exists():
        return
    if model == RANDOM_MODEL:
        from tinyvlm.build import build

        logging.getLogger(__name__).info("building the random tiny model into %s", path)
        build(path)
    elif model == DEFAULT_MODEL:
        sys.exit(
            f"the trained tiny model is not at {path}: run from the repository root (it is committed) "
            "or retrain it with `make shapes-model`"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm-servicer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the gRPC servicer; unknown flags go to vLLM's engine")
    add_serve_flags(serve_parser)
    serve_parser.add_argument("--log-level", default="INFO")
    build_parser = commands.add_parser("build-tiny-model", help="write the deterministic random-weight tiny Qwen2-VL")
    build_parser.add_argument("--out", default=RANDOM_MODEL)
    args, rest = parser.parse_known_args(argv)

    if args.command == "build-tiny-model":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from tinyvlm.build import build

        print(f"tiny Qwen2-VL written to {build(pathlib.Path(args.out))}")
        return 0

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args, rest)
    except ConfigError as exc:
        parser.error(str(exc))
    _ensure_tiny_model(config.model)
    from servicer.server import serve

    return uvloop.run(serve(config))  # as vLLM's own servers run (the incumbent too)


if __name__ == "__main__":
    sys.exit(main())
