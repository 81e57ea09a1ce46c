"""The server's model table: which models it serves, in which versions, on which engines.

:class:`ModelTable` maps served names to versions to engines; :class:`Traffic` splits a
model's requests between its versions (weights, sticky users or tenants, least-loaded
variants) and a :class:`RollbackRule` takes the traffic back from a failing canary. A
registered version is verified against its manifest and signature at every load.

Names are imported on first use, so reading ``--serve`` entries (:mod:`.spec`) does not
load torch: ``autoglm --help`` stays fast.
"""

from __future__ import annotations

from auto_glm.lazy import lazy_names

__all__ = [
    "EngineSource",
    "Lease",
    "LoadSettings",
    "ModelTable",
    "ModelUnavailable",
    "PathSource",
    "RegisteredSource",
    "RollbackEvent",
    "RollbackRule",
    "ServeSpec",
    "ServedModel",
    "ServedVersion",
    "Traffic",
    "TrafficError",
    "UnknownModel",
    "VersionState",
    "parse_duration",
]

_HOMES = {
    "ModelUnavailable": "errors",
    "UnknownModel": "errors",
    "EngineSource": "sources",
    "LoadSettings": "sources",
    "PathSource": "sources",
    "RegisteredSource": "sources",
    "ServeSpec": "spec",
    "parse_duration": "spec",
    "Lease": "model",
    "ModelTable": "table",
    "RollbackEvent": "model",
    "ServedModel": "model",
    "RollbackRule": "traffic",
    "Traffic": "traffic",
    "TrafficError": "traffic",
    "ServedVersion": "version",
    "VersionState": "version",
}


__getattr__ = lazy_names("auto_glm.fleet", _HOMES)
