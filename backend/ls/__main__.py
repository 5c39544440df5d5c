"""``python -m backend.ls``: serve the Label Studio ML backend (gunicorn, threaded workers).

The backend alone: ``worker/`` need not be installed (the backend Docker image has none).
``semlabel serve`` runs the same server, optionally with Redis and a training worker beside it.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from . import server


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backend.ls", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=None, help="default: backend.server.port")
    p.add_argument("--workers", type=int, default=1,
                   help="processes; each loads the model (on CPU prefer 1 with several threads)")
    p.add_argument("--threads", type=int, default=None,
                   help="request threads per process (default: backend.server.threads)")
    p.add_argument("--timeout", type=int, default=None,
                   help="seconds a request may take (Label Studio waits 100 s for /predict; "
                        "default: backend.server.timeout_s)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--insecure", action="store_true",
                   help="serve on a non-loopback address without credentials")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    server.setup_logging(args.verbose)
    try:
        server.serve(host=args.host, port=args.port, workers=args.workers, threads=args.threads,
                     timeout=args.timeout, access_log=args.access_log, insecure=args.insecure)
    except ConfigError as exc:
        print(f"semlabel: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
