"""`amusd serve`: parse settings, build the engine supervisor, run uvicorn, shut down cleanly.

    amusd serve --config configs/tiny.yaml --port 8000
    python -m server.main --help                      # every setting with its default

SIGTERM/SIGINT: uvicorn stops accepting connections, lets in-flight requests finish for up to
`shutdown_grace_s`, then cancels the rest; the app's lifespan then shuts the supervisor down (and
so its worker processes). The supervisor is shut down here again in any case (idempotent), so a
forced exit (second Ctrl-C) leaves no orphan workers. Exit codes: 0 ok, 1 start-up failed,
2 bad settings.
"""
from __future__ import annotations

import logging
import signal
import sys

import uvicorn
import yaml
from pydantic import ValidationError

from engine.config import ConfigError
from server.settings import load_settings

logger = logging.getLogger("amusd.server")


def _format_validation(exc: ValidationError) -> str:
    lines = [f"  {'.'.join(map(str, e['loc'])) or '?'}: {e['msg']} (got {e.get('input')!r})"
             for e in exc.errors()]
    return "invalid settings:\n" + "\n".join(lines)


class _Server(uvicorn.Server):
    """uvicorn.Server that also tells the app to drain when SIGTERM/SIGINT arrives."""

    def __init__(self, config: uvicorn.Config, on_exit) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._on_exit()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings(argv)
        settings.to_engine_config()          # check engine settings before anything starts
    except SystemExit as exc:                # --help, or argparse rejected a flag
        return int(exc.code or 0)
    except ValidationError as exc:
        print(f"amusd serve: {_format_validation(exc)}", file=sys.stderr)
        return 2
    except (ConfigError, FileNotFoundError, yaml.YAMLError, ValueError) as exc:
        print(f"amusd serve: {exc}", file=sys.stderr)
        return 2

    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("settings: %s", settings.public_dict())

    from server.app import begin_drain, create_app     # imported late: keeps --help fast
    from server.engine_client import make_supervisor
    try:
        supervisor = make_supervisor(settings)
    except Exception as exc:
        print(f"amusd serve: cannot set up the engine: {exc}", file=sys.stderr)
        return 1

    app = create_app(settings, supervisor)
    # the app cancels what is left after shutdown_grace_s (streams end with an error event);
    # uvicorn's own hard limit comes a little later, for requests that ignore that
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level.lower(), access_log=settings.access_log,
                            timeout_graceful_shutdown=round(settings.shutdown_grace_s + 5),
                            lifespan="on", timeout_keep_alive=5)
    server = _Server(config, on_exit=lambda: begin_drain(app))
    # uvicorn re-raises the signal that stopped it once it is done; make that a no-op so that we
    # get to shut the supervisor down and exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        server.run()
        if not server.started:
            code = 1
    except SystemExit as exc:                # uvicorn exits 3 when the lifespan start-up failed
        code = 1 if exc.code else 0
    except KeyboardInterrupt:
        code = 0
    finally:
        try:
            supervisor.shutdown()
        except Exception as exc:
            logger.warning("supervisor shutdown: %s", exc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code:
        print("amusd serve: the server did not start (see the log above)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
