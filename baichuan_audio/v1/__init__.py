"""Generated stubs of proto/baichuan_audio/v1/*.proto (conversation_pb2, stages_pb2 and their _grpc)."""
