"""Ray Serve application builders: one application per stage plus the conversation app.

Each builder takes the args dict of a Serve config (`{"config": "/path/settings.yaml"}`;
see k8s/ and `baichuan-audio serve`) and applies that stage's replicas, autoscaling and GPU
share from the settings. Scaling lives in config, not code."""
from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.deployment import Deployment

from services.common.autoscaling import POLICY as AUTOSCALING_POLICY
from services.common.runtime import load_settings
from services.common.settings import Settings, StageSettings

APP_NAMES = ("tokenizer", "llm", "decoder", "vocoder", "conversation")

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


def deployment_options(stage: StageSettings, work_stream: bool = False) -> dict[str, Any]:
    """Replicas and resources of a stage. A work-stream stage (decoder, vocoder) autoscales on
    its Redis backlog, which Serve's request counts do not see (services/common/autoscaling.py)."""
    actor = {"num_cpus": stage.num_cpus, "num_gpus": stage.num_gpus}
    if stage.max_replicas > stage.min_replicas:
        autoscaling = {"min_replicas": stage.min_replicas, "max_replicas": stage.max_replicas,
                       "target_ongoing_requests": stage.target_ongoing_requests}
        if work_stream:
            autoscaling["policy"] = {"policy_function": AUTOSCALING_POLICY}
        return {"ray_actor_options": actor, "autoscaling_config": autoscaling}
    return {"ray_actor_options": actor, "num_replicas": stage.min_replicas}


def _build(deployment: Deployment, stage: StageSettings, args: dict | None,
           work_stream: bool = False) -> Application:
    return deployment.options(**deployment_options(stage, work_stream)).bind((args or {}).get("config"))


def _settings(args: dict | None) -> Settings:
    return load_settings((args or {}).get("config"))


def tokenizer_app(args: dict | None = None) -> Application:
    from services.tokenizer.deployment import TokenizerDeployment
    return _build(TokenizerDeployment, _settings(args).stages.tokenizer, args)


def llm_app(args: dict | None = None) -> Application:
    from services.llm.deployment import LLMDeployment
    return _build(LLMDeployment, _settings(args).stages.llm, args)


def decoder_app(args: dict | None = None) -> Application:
    from services.decoder.deployment import DecoderDeployment
    return _build(DecoderDeployment, _settings(args).stages.decoder, args, work_stream=True)


def vocoder_app(args: dict | None = None) -> Application:
    from services.vocoder.deployment import VocoderDeployment
    return _build(VocoderDeployment, _settings(args).stages.vocoder, args, work_stream=True)


def conversation_app(args: dict | None = None) -> Application:
    from orchestrator.deployment import ConversationDeployment
    return _build(ConversationDeployment, _settings(args).stages.orchestrator, args)


BUILDERS = {"tokenizer": tokenizer_app, "llm": llm_app, "decoder": decoder_app,
            "vocoder": vocoder_app, "conversation": conversation_app}
