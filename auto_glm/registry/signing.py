"""Signatures of model versions: OpenSSF model signing (``model_signing``) with EC key pairs.

A signature is a Sigstore bundle (DSSE envelope over an in-toto statement) that lists every
file's SHA-256, exactly as ``model_signing sign key`` would for the model directory; the
registry keeps its JSON text in the database, so the model directory holds only the model.

Signing reuses the manifest's digests instead of hashing the files again, and verification
checks the bundle against a trusted public key and then compares the signed digests with
the manifest; :func:`~auto_glm.registry.hashing.verify_files` compares the manifest with
the files, so the files are hashed once per check. Both go below ``model_signing``'s
high-level ``Config`` (which always hashes the directory itself) to its signer, verifier
and manifest classes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Literal, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from model_signing import manifest as signed_manifest
from model_signing._hashing.hashing import Digest
from model_signing._signing import sign_ec_key, sign_sigstore_pb
from model_signing._signing.signing import Payload
from sigstore_models.bundle.v1 import Bundle

from auto_glm.registry.errors import RegistryError, SignatureError
from auto_glm.registry.manifest import Manifest

__all__ = [
    "POLICIES",
    "SignaturePolicy",
    "check_signature",
    "fingerprint",
    "generate_key_pair",
    "load_private_key",
    "load_public_key",
    "short",
    "sign_manifest",
]

SignaturePolicy = Literal["off", "optional", "required"]
POLICIES: tuple[str, ...] = ("off", "optional", "required")
_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model_signing's EC signer accepts
_KEYGEN = "make a pair with `autoglm models keygen DIR`"
_SERIALIZATION = {"method": "files", "hash_type": "sha256", "allow_symlinks": False}


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 hex of the key's PEM: model_signing's key hint in the bundle, too."""
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def short(key_fingerprint: str | None) -> str:
    """A fingerprint as messages show it: ``sha256:`` and its first 16 hex digits."""
    return f"sha256:{key_fingerprint[:16]}" if key_fingerprint else "an unknown key"


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise RegistryError(
            f"cannot read the {what} {path}: {error.strerror}; give its PEM file ({_KEYGEN})"
        ) from None


def _check_curve(key: object, path: Path, what: str) -> None:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        raise RegistryError(
            f"{path} is a {type(key).__name__.lstrip('_')}, not an elliptic-curve key; model "
            f"signing needs an EC {what} on P-256, P-384 or P-521: {_KEYGEN}"
        )
    if key.curve.name not in _CURVES:
        raise RegistryError(
            f"{path} is on curve {key.curve.name}; model signing needs P-256, P-384 or "
            f"P-521: {_KEYGEN}"
        )


def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """The EC private key in the PEM file ``path``, or :class:`SignatureError` saying why not."""
    path = Path(path)
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise RegistryError(
            f"the signing key {path} is encrypted; use an unencrypted one ({_KEYGEN}) and "
            "keep it readable only by you (mode 0600)"
        ) from None
    except ValueError:
        raise RegistryError(
            f"{path} is not a PEM private key: give the private key ('signing-key.pem', not "
            f"the .pub.pem) to sign with ({_KEYGEN})"
        ) from None
    _check_curve(key, path, "private key")
    return cast(ec.EllipticCurvePrivateKey, key)


def load_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """The EC public key in the PEM file ``path``, or :class:`SignatureError` saying why not."""
    data = _read(Path(path), "trusted public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise RegistryError(
            f"{path} is not a PEM public key: give a public key ('signing-key.pub.pem') to "
            f"trust ({_KEYGEN})"
        ) from None
    _check_curve(key, Path(path), "public key")
    return cast(ec.EllipticCurvePublicKey, key)


def generate_key_pair(directory: str | Path) -> tuple[Path, Path]:
    """Write ``signing-key.pem`` (private, mode 0600) and ``signing-key.pub.pem`` (EC P-256)."""
    directory = Path(directory)
    private, public = directory / "signing-key.pem", directory / "signing-key.pub.pem"
    for path in (private, public):
        if path.exists():
            raise RegistryError(
                f"{path} already exists: keygen never overwrites a key; choose another "
                "directory, or move the old pair away first"
            )
    key = ec.generate_private_key(ec.SECP256R1())
    pems = {
        private: key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        public: key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path, pem in pems.items():
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(descriptor, "wb") as file:
                os.fchmod(file.fileno(), 0o600 if path == private else 0o644)
                file.write(pem)
    except OSError as error:
        raise RegistryError(
            f"cannot write the key pair into {directory}: {error.strerror}; choose a "
            "writable directory"
        ) from None
    return private, public


def sign_manifest(manifest: Manifest, ref: str, private_key: str | Path) -> tuple[str, str]:
    """Sign ``manifest``'s digests as model ``ref``: (bundle JSON, signer's key fingerprint)."""
    key = load_private_key(private_key)
    serialization_type = signed_manifest.SerializationType.from_args(_SERIALIZATION)
    items = [
        signed_manifest.FileManifestItem(
            path=PurePosixPath(entry.path), digest=Digest("sha256", bytes.fromhex(entry.sha256))
        )
        for entry in manifest.files
    ]
    payload = Payload(signed_manifest.Manifest(ref, items, serialization_type))
    signature = sign_ec_key.Signer(Path(private_key)).sign(payload)
    return signature.bundle.to_json(), fingerprint(key.public_key())


def _signed_digests(bundle: str, public_key: Path) -> tuple[str, dict[str, str]]:
    """The model name and file digests that ``bundle`` signs, if ``public_key`` signed it."""
    signature = sign_sigstore_pb.Signature(Bundle.from_json(bundle))
    signed = sign_ec_key.Verifier(public_key).verify(signature)
    if signed.serialization_type.get("method") != "files":
        raise ValueError(f"it signs {signed.serialization_type.get('method')}, not whole files")
    digests: dict[str, str] = {}
    for resource in signed.resource_descriptors():
        if resource.digest.algorithm != "sha256":
            raise ValueError(f"it uses {resource.digest.algorithm}, not sha256")
        digests[resource.identifier] = resource.digest.digest_hex
    return signed.model_name, digests


def _compare(ref: str, signed: dict[str, str], manifest: Manifest) -> None:
    stored = manifest.digests()
    differences = [
        f"'{path}' is signed as {signed[path]} but the manifest has {stored[path]}"
        if path in signed and path in stored
        else f"'{path}' is {'signed but not in the manifest' if path in signed else 'unsigned'}"
        for path in sorted(set(signed) | set(stored))
        if signed.get(path) != stored.get(path)
    ]
    if differences:
        raise SignatureError(
            f"signature of {ref} does not match its manifest ({'; '.join(differences)}): the "
            "stored manifest changed after signing; remove the version and register it again"
        )


def check_signature(
    ref: str,
    signature: str | None,
    signer: str | None,
    manifest: Manifest,
    policy: str,
    trusted_keys: Sequence[str | Path] = (),
) -> str | None:
    """Apply ``policy`` to model version ``ref``: the fingerprint of the trusted key that
    verified its signature, None if none was checked (policy off, or allowed unsigned)."""
    if policy not in POLICIES:
        raise RegistryError(
            f"signature policy {policy!r} is invalid: use off, optional or required"
        )
    if policy == "off":
        return None
    # every trusted key is read, signed version or not: a wrong file is named at once, not
    # at the first signed version
    keys = [(Path(path), load_public_key(path)) for path in trusted_keys]
    if signature is None:
        if policy == "required":
            raise SignatureError(
                f"{ref} has no signature and verify_signatures is required; sign it with "
                f"`autoglm models sign {ref} --sign-key KEY`, or set the policy to optional"
            )
        return None
    if not trusted_keys:
        if policy == "required":
            raise SignatureError(
                f"{ref} is signed by {short(signer)} but no trusted public key was given and "
                "verify_signatures is required; pass the signer's public key with "
                "--trusted-key PUB.pem"
            )
        return None
    for path, key in keys:
        try:
            name, digests = _signed_digests(signature, path)
        except (ValueError, KeyError, TypeError, InvalidSignature):
            continue
        if name != ref:
            raise SignatureError(
                f"signature of {ref} was made for {name}; sign {ref} itself with "
                f"`autoglm models sign {ref} --sign-key KEY`"
            )
        _compare(ref, digests, manifest)
        return fingerprint(key)
    listing = ", ".join(f"{path} ({short(fingerprint(key))})" for path, key in keys)
    raise SignatureError(
        f"signature of {ref} does not verify with any trusted key (keys: {listing}); it names "
        f"{short(signer)} as its signer: trust that key with --trusted-key if it is yours, or "
        f"re-sign with a trusted one: `autoglm models sign {ref} --sign-key KEY`"
    )
