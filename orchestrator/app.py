"""Ray Serve application builders: one application per stage plus the conversation app.

Each builder takes the args dict of a Serve config (`{"config": "/path/settings.yaml"}`;
see k8s/ and `baichuan-audio serve`) and applies that stage's replicas, autoscaling and GPU
share from the settings. Scaling lives in config, not code."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray.serve import Application
from ray.serve.deployment import Deployment

from services.common.autoscaling import POLICY as AUTOSCALING_POLICY
from services.common.runtime import load_settings
from services.common.settings import AutoscalingSettings, Settings, StageSettings


@dataclass(frozen=True)
class AppSpec:
    """One Serve application: the single source of names, import paths and per-deployment
    tuning for `baichuan-audio serve` (and `make demo`) and for the RayService's serveConfigV2
    (orchestrator/serve_config.py generates it)."""
    name: str            # application name = the gRPC `application` metadata = route /name
    deployment: str      # the @serve.deployment name
    stage: str           # its section under `stages:` in the settings
    work_stream: bool = False  # autoscales on its Redis backlog (services/common/autoscaling.py)
    # Serve options the settings do not carry. max_ongoing_requests caps what one replica
    # accepts (Serve's default of 5 would queue streaming turns in the proxy); the long graceful
    # shutdown lets a draining replica finish the turns it streams.
    options: dict = field(default_factory=dict)
    autoscaling: dict = field(default_factory=dict)  # extra autoscaling_config keys

    @property
    def import_path(self) -> str:
        return f"{__name__}:{self.name}_app"


APPLICATIONS = (  # the conversation app last: it looks up the others' handles
    AppSpec("tokenizer", "Tokenizer", "tokenizer", options={"max_ongoing_requests": 16}),
    AppSpec("llm", "LLM", "llm", options={"max_ongoing_requests": 32, "graceful_shutdown_timeout_s": 120},
            # A new LLM replica loads ~15 GB of weights: scale down slowly.
            autoscaling={"upscale_delay_s": 30, "downscale_delay_s": 600}),
    # A backlog is work already waiting: up at once (Serve 2.60 applies a custom policy's delays too).
    AppSpec("decoder", "Decoder", "decoder", work_stream=True, options={"max_ongoing_requests": 16},
            autoscaling={"upscale_delay_s": 0}),
    AppSpec("vocoder", "Vocoder", "vocoder", work_stream=True, options={"max_ongoing_requests": 16},
            autoscaling={"upscale_delay_s": 0}),
    AppSpec("conversation", "Conversation", "orchestrator",
            options={"max_ongoing_requests": 128, "graceful_shutdown_timeout_s": 120}),
)
APP_NAMES = tuple(a.name for a in APPLICATIONS)
# The Realtime API and the voice page: an HTTP ingress on Serve's HTTP proxy at /, reaching the
# conversation app through its handle (deployed after it, with serving.realtime; the
# Kubernetes serve configs include it and the Service opens the HTTP port).
REALTIME = AppSpec("realtime", "Realtime", "orchestrator",
                   options={"max_ongoing_requests": 256, "graceful_shutdown_timeout_s": 30})
APPS = {a.name: a for a in APPLICATIONS + (REALTIME,)}

# The gRPC services on Serve's proxy: the public ones always; the stage services only with
# serving.stage_services (they bypass the conversation service's limits; each call also needs
# an internal key, services/common/auth.py).
PUBLIC_SERVICERS = [
    "baichuan_audio.v1.conversation_pb2_grpc.add_ConversationServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
STAGE_SERVICERS = [
    "baichuan_audio.v1.stages_pb2_grpc.add_TokenizerServicer_to_server",
    "baichuan_audio.v1.stages_pb2_grpc.add_LLMServicer_to_server",
    "baichuan_audio.v1.stages_pb2_grpc.add_DecoderServicer_to_server",
    "baichuan_audio.v1.stages_pb2_grpc.add_VocoderServicer_to_server",
]
SERVICER_FUNCTIONS = PUBLIC_SERVICERS + STAGE_SERVICERS


def servicer_functions(settings: Settings) -> list[str]:
    """What the proxy serves under these settings."""
    return PUBLIC_SERVICERS + (STAGE_SERVICERS if settings.serving.stage_services else [])


def deployment_options(stage: StageSettings, app: AppSpec | None = None,
                       pace: AutoscalingSettings | None = None) -> dict[str, Any]:
    """Replicas, resources and tuning of a stage's deployment, as Serve's deployment options
    (the same keys as a Serve config's `deployments:` entry, less the name); `pace`: how often
    an autoscaling stage's load is measured (settings `autoscaling:`)."""
    actor = {"num_cpus": stage.num_cpus, "num_gpus": stage.num_gpus}
    out: dict[str, Any] = dict(app.options) if app else {}
    if stage.max_replicas > stage.min_replicas:
        autoscaling = {"min_replicas": stage.min_replicas, "max_replicas": stage.max_replicas,
                       "target_ongoing_requests": stage.target_ongoing_requests,
                       **(pace.model_dump() if pace else {}), **(app.autoscaling if app else {})}
        if app and app.work_stream:  # Serve's request counts do not see a Redis backlog
            autoscaling["policy"] = {"policy_function": AUTOSCALING_POLICY}
        out["autoscaling_config"] = autoscaling
    else:
        out["num_replicas"] = stage.min_replicas
    out["ray_actor_options"] = actor
    return out


def _build(deployment: Deployment, app: str, args: dict | None, **init: Any) -> Application:
    spec, settings = APPS[app], _settings(args)
    options = deployment_options(getattr(settings.stages, spec.stage), spec, settings.autoscaling)
    return deployment.options(**options).bind((args or {}).get("config"), **init)


def _settings(args: dict | None) -> Settings:
    return load_settings((args or {}).get("config"))


def tokenizer_app(args: dict | None = None) -> Application:
    from services.tokenizer.deployment import TokenizerDeployment
    return _build(TokenizerDeployment, "tokenizer", args)


def llm_app(args: dict | None = None) -> Application:
    from services.llm.deployment import LLMDeployment
    return _build(LLMDeployment, "llm", args)


def decoder_app(args: dict | None = None) -> Application:
    from services.decoder.deployment import DecoderDeployment
    return _build(DecoderDeployment, "decoder", args)


def vocoder_app(args: dict | None = None) -> Application:
    from services.vocoder.deployment import VocoderDeployment
    return _build(VocoderDeployment, "vocoder", args)


def conversation_app(args: dict | None = None) -> Application:
    from orchestrator.deployment import ConversationDeployment
    # the replica sizes its stream readers' pool by the calls Serve lets it hold
    return _build(ConversationDeployment, "conversation", args,
                  max_ongoing_requests=APPS["conversation"].options["max_ongoing_requests"])


def realtime_app(args: dict | None = None) -> Application:
    from orchestrator.realtime_deployment import RealtimeDeployment
    return _build(RealtimeDeployment, "realtime", args)


BUILDERS = {"tokenizer": tokenizer_app, "llm": llm_app, "decoder": decoder_app,
            "vocoder": vocoder_app, "conversation": conversation_app, "realtime": realtime_app}
