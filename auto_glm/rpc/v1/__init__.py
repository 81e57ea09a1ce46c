"""Generated gRPC stubs of proto/autoglm/v1/inference.proto (python -m auto_glm.rpc.codegen)."""
