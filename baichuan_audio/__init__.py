"""The API package: gRPC stubs generated from proto/ (see services/common/protogen.py).

The package folders are committed so that every install (editable or not) maps them; the
generated `*_pb2*.py` modules inside `v1/` are written at install time and never committed."""
