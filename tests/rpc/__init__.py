"""Tests of the gRPC API: its generated stubs and the Python clients against a real server."""
