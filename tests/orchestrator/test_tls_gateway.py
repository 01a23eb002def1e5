"""TLS and mutual TLS in front of the stack. Ray Serve 2.60's gRPC proxy listens in plaintext
only, so TLS ends at a gateway (in Kubernetes: the ingress or Gateway API listener). Here a
small TLS-terminating gRPC forwarder plays that gateway, requiring client certificates, in
front of the real stack; the `baichuan-audio` client talks to it with --tls, its CA and its
client certificate, and its API key still decides who it is."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import soundfile as sf

from orchestrator.cli import main
from tests.certs import make_certs
from tests.orchestrator.test_service import QUESTION

STREAMING = ("/Converse", "/Synthesize")
FORWARDED = ("application", "authorization")


class Forward(grpc.GenericRpcHandler):
    """Every call, as raw bytes, to the upstream plaintext proxy (what a gateway does)."""

    def __init__(self, upstream: grpc.Channel):
        self.upstream = upstream

    def service(self, details):
        method = details.method
        md = [(k, v) for k, v in details.invocation_metadata if k in FORWARDED]

        def relay_error(e: grpc.RpcError, context) -> None:
            context.set_trailing_metadata(e.trailing_metadata() or ())
            context.abort(e.code(), e.details())

        if method.endswith(STREAMING):
            def stream(request: bytes, context):
                try:
                    yield from self.upstream.unary_stream(method)(request, metadata=md)
                except grpc.RpcError as e:
                    relay_error(e, context)
            return grpc.unary_stream_rpc_method_handler(stream)

        def unary(request: bytes, context):
            try:
                return self.upstream.unary_unary(method)(request, metadata=md)
            except grpc.RpcError as e:
                relay_error(e, context)
        return grpc.unary_unary_rpc_method_handler(unary)


@pytest.fixture(scope="module")
def gateway(serve_stack, tmp_path_factory):
    for app in ("tokenizer", "llm", "decoder", "vocoder", "conversation"):
        serve_stack.deploy(app)
    c = make_certs(tmp_path_factory.mktemp("gateway-tls"))
    creds = grpc.ssl_server_credentials([(c["server.key"].read_bytes(), c["server.crt"].read_bytes())],
                                        root_certificates=c["ca.crt"].read_bytes(), require_client_auth=True)
    upstream = grpc.insecure_channel(serve_stack.address)
    server = grpc.server(ThreadPoolExecutor(8), handlers=[Forward(upstream)])
    port = server.add_secure_port("localhost:0", creds)
    server.start()
    yield f"localhost:{port}", c
    server.stop(0)
    upstream.close()


def test_client_over_mutual_tls(gateway, serve_stack, tmp_path, capsys):
    address, c = gateway
    tls = ["--tls", "--ca-file", str(c["ca.crt"]), "--cert-file", str(c["client.crt"]),
           "--key-file", str(c["client.key"])]
    args = ["--address", address, "--api-key-file", str(serve_stack.api_keys_file), *tls]
    out = tmp_path / "reply.wav"
    assert main(["converse", str(QUESTION), "-o", str(out), *args]) == 0
    assert sf.info(str(out)).frames > 0
    assert main(["transcribe", str(QUESTION), *args]) == 0
    capsys.readouterr()
    # TLS is not authentication: without the API key the stack still refuses
    keyless = tmp_path / "empty-key"
    keyless.write_text("not-an-issued-key-0123456789\n")
    assert main(["transcribe", str(QUESTION), "--address", address, "--api-key-file", str(keyless), *tls]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no client certificate", "another CA", "plaintext"])
def test_the_gateway_refuses_what_mutual_tls_does_not_allow(gateway, serve_stack, capsys, case):
    address, c = gateway
    tls = {"no client certificate": ["--tls", "--ca-file", str(c["ca.crt"])],
           "another CA": ["--tls", "--ca-file", str(c["other-ca.crt"]), "--cert-file", str(c["client.crt"]),
                          "--key-file", str(c["client.key"])],
           "plaintext": []}[case]
    rc = main(["transcribe", str(QUESTION), "--address", address, "--timeout", "10",
               "--api-key-file", str(serve_stack.api_keys_file), *tls])
    assert rc == 1 and "UNAVAILABLE" in capsys.readouterr().err


def test_half_a_client_certificate_is_a_clear_error(gateway, capsys):
    address, c = gateway
    assert main(["transcribe", str(QUESTION), "--address", address, "--tls", "--cert-file", str(c["client.crt"])]) == 1
    assert "--cert-file and --key-file" in capsys.readouterr().err
