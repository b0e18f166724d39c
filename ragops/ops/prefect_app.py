"""`python -m ragops.ops.prefect_app --host H --port P --allowed-hosts a,b`: the Prefect server
(API, UI and background services: scheduler, late runs, ...) as `prefect server start` runs it,
plus a check of the `Host` header.

Why not plain `prefect server start`: Prefect answers any `Host`, so a web page the user visits can
rebind its own domain name to 127.0.0.1 (DNS rebinding) and then talk to the server as a
same-origin page, where CORS restrictions do not apply. Starlette's `TrustedHostMiddleware`
answers 400 to a request whose `Host` is not one of the allowed names. Everything else (CORS
origins, CSRF protection, the auth string) is Prefect's own, configured through its settings by
`ragops.ops.servers.start_prefect_server`.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--allowed-hosts", default="127.0.0.1,localhost", help="comma-separated Host names; '*' for any")
    args = parser.parse_args(argv)

    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import (
        PREFECT_SERVER_API_KEEPALIVE_TIMEOUT,
        PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
        PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT,
        PREFECT_SERVER_LOGGING_LEVEL,
    )
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    # As `prefect server start` (foreground, one worker): API + UI + services in this process.
    app = create_app(final=True)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[h.strip() for h in args.allowed_hosts.split(",") if h.strip()])
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
        ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
        ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
        log_level=PREFECT_SERVER_LOGGING_LEVEL.value().lower(),
    )


if __name__ == "__main__":
    main()
