"""The gRPC API (``proto/autoglm/v1/inference.proto``): the servicer on the transport-neutral
front end (:mod:`.servicer`), the server beside the HTTP one (:mod:`.server`), status
mapping (:mod:`.status`), message conversion (:mod:`.convert`) and the generated stubs
(:mod:`.v1`, rebuilt by ``python -m auto_glm.rpc.codegen``). The Python client is
:mod:`auto_glm.client`."""
