"""`amusd serve-ray`: run the server as a Ray Serve application (one engine per replica).

    amusd serve-ray --config configs/ray.yaml                  # local Ray cluster on this host
    amusd serve-ray --config configs/ray.yaml --address auto   # the cluster `ray start --head` runs here

Blocks until SIGINT/SIGTERM, then deletes the application (and stops the local cluster it
started). Ray is imported only here, after the config has been checked: without it the command
says `pip install -e .[ray]`. Exit codes: 0 ok, 1 Ray missing or start-up failed, 2 bad config.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from server.ray_config import RayConfigError, load_ray_config

logger = logging.getLogger("amusd.ray")
MISSING_RAY = ("amusd serve-ray needs Ray Serve, which is an optional extra: "
               "pip install -e .[ray]   (or: pip install 'ray[serve]')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amusd serve-ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.environ.get("AMUSD_RAY_CONFIG", "configs/ray.yaml"),
                        help="Ray config file (configs/ray.yaml; also AMUSD_RAY_CONFIG)")
    parser.add_argument("--address", default=None, help="Ray cluster address (overrides the config's)")
    parser.add_argument("--http-host", default=None, help="where Serve's HTTP proxy listens")
    parser.add_argument("--http-port", type=int, default=None, help="Serve's HTTP port")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        config = load_ray_config(args.config, address=args.address, http_host=args.http_host,
                                 http_port=args.http_port)
    except RayConfigError as exc:
        print(f"amusd serve-ray: {exc}", file=sys.stderr)
        return 2
    try:
        import ray
        from server import ray_serve
    except ImportError as exc:
        print(f"{MISSING_RAY}\n({exc})", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    is_local = config.address is None and not os.environ.get("RAY_ADDRESS")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if is_local:
            os.environ.update(ray_serve.local_cluster_env())
        ray.init(address=config.address)
        ray_serve.deploy(config)
        logger.info("serving on http://%s:%d%s (`serve status` lists the replicas); Ctrl-C stops",
                    config.http_host, config.http_port, config.route_prefix)
        stop.wait()
        return 0
    except Exception as exc:
        print(f"amusd serve-ray: the deployment failed: {exc}", file=sys.stderr)
        return 1
    finally:
        try:
            from ray import serve
            if is_local:
                serve.shutdown()
            else:
                serve.delete(config.app_name)
        except Exception as exc:
            logger.warning("shutting Serve down: %s", exc)
        if is_local:
            ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
