"""`baichuan-audio serve`: deploy the five Serve applications on a local or existing Ray cluster."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from services.common.settings import CONFIG_ENV, ENV_PREFIX, Settings

MESSAGE_SIZE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"


def grpc_options(settings: Settings, port: int | None = None):
    """Serve's gRPC proxy: the public services (the stage services too with
    `serving.stage_services`), reflection as `serving.reflection` says."""
    from ray.serve.config import gRPCOptions

    from orchestrator.app import servicer_functions

    return gRPCOptions(port=port or settings.serving.grpc_port, grpc_servicer_functions=servicer_functions(settings),
                       enable_reflection=settings.serving.reflection)


def local_api_key(settings: Settings, log=print) -> dict[str, str]:
    """A local stack that requires keys but has none configured gets one: a key file made once
    (owner-only) where the client commands look for it. Returns the environment that points the
    replicas at it (a path, never the key)."""
    from orchestrator.client import local_key_file
    from services.common.auth import write_key_file

    a = settings.auth
    if not a.required or a.api_keys_file or a.api_keys:
        return {}
    path = local_key_file()
    if not path.is_file():
        write_key_file(path, name="local")
        log(f"  made an API key for this machine in {path} (the client commands read it)")
    return {f"{ENV_PREFIX}AUTH__API_KEYS_FILE": str(path)}


def start_serve(settings_path: str | None, *, address: str | None = None, grpc_port: int | None = None,
                http_port: int | None = None, env: dict[str, str] | None = None, num_cpus: int | None = None,
                log=print, **ray_init: object) -> tuple[int, dict[str, str | None]]:
    """Start (or join) Ray and start Serve with its gRPC proxy as the settings say, without
    deploying anything. Returns the gRPC port and the app builders' args.

    Replicas read the settings file named by BAICHUAN_AUDIO_CONFIG and the environment given
    here (REDIS_URL, MODEL_PATH, ...); the proxy's message cap comes from
    limits.max_message_bytes; a local stack that requires API keys and has none gets one
    (local_api_key). ray_init: further ray.init options for a local cluster."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    settings = Settings.load(settings_path)  # fail early, naming the bad key
    env = dict(env or {})
    if not address:
        env.update(local_api_key(settings, log))
    # Serve's gRPC proxy reads its message cap from the environment; a bigger request gets
    # RESOURCE_EXHAUSTED from gRPC itself before it reaches a replica
    env.setdefault(MESSAGE_SIZE_ENV, str(settings.limits.max_message_bytes))
    if settings_path:
        env[CONFIG_ENV] = str(Path(settings_path).resolve())
    os.environ.update(env)
    port = grpc_port or settings.serving.grpc_port
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False,
                 **ray_init)
    serve.start(grpc_options=grpc_options(settings, port), http_options={"host": settings.serving.host,
                                                                           "port": http_port or settings.serving.http_port})
    return port, {"config": env.get(CONFIG_ENV)}


def start_stack(settings_path: str | None, *, address: str | None = None, grpc_port: int | None = None,
                http_port: int | None = None, env: dict[str, str] | None = None, num_cpus: int | None = None,
                log=print) -> int:
    """Start (or join) Ray, start Serve with its gRPC proxy and deploy every application.
    Returns the gRPC port."""
    from ray import serve

    from orchestrator.app import APP_NAMES, BUILDERS

    port, args = start_serve(settings_path, address=address, grpc_port=grpc_port, http_port=http_port,
                             env=env, num_cpus=num_cpus, log=log)
    for name in APP_NAMES:  # the conversation app last: it looks up the others' handles
        log(f"  starting {name} ...")
        serve.run(BUILDERS[name](args), name=name, route_prefix=f"/{name}")
    if Settings.load(settings_path).serving.realtime:
        log("  starting realtime (the Realtime API and the voice page on the HTTP port) ...")
        serve.run(BUILDERS["realtime"](args), name="realtime", route_prefix="/")
    return port


def serve_main(args: argparse.Namespace) -> int:
    import ray

    port = start_stack(args.config, address=args.address)
    print(f"serving gRPC on port {port} (send metadata 'application: conversation'); Ray cluster at "
          f"{ray.get_runtime_context().gcs_address}; Ctrl-C to stop")
    if args.detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        print("shutting down", file=sys.stderr)
        ray.shutdown()
    return 0
