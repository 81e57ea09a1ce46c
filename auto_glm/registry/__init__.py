"""The model registry: named, versioned models with a manifest of every file and a signature.

:class:`ModelRegistry` keeps the versions in the tenant store's database; a
:class:`ModelVersion`'s :class:`Manifest` lists each file's SHA-256 and size, and
:meth:`ModelRegistry.verify` checks the files (:func:`verify_files`) and the OpenSSF model
signature before a load. ``autoglm models`` (:mod:`auto_glm.registry.cli`) manages it.
"""

from auto_glm.registry.copies import default_registry_dir
from auto_glm.registry.errors import IntegrityError, RegistryError, SignatureError
from auto_glm.registry.hashing import VerifyReport, verify_files
from auto_glm.registry.manifest import FileEntry, Manifest, build_manifest
from auto_glm.registry.models import ModelVersion
from auto_glm.registry.signing import POLICIES, SignaturePolicy, generate_key_pair
from auto_glm.registry.store import ModelRegistry

__all__ = [
    "POLICIES",
    "FileEntry",
    "IntegrityError",
    "Manifest",
    "ModelRegistry",
    "ModelVersion",
    "RegistryError",
    "SignatureError",
    "SignaturePolicy",
    "VerifyReport",
    "build_manifest",
    "default_registry_dir",
    "generate_key_pair",
    "verify_files",
]
