"""Signatures: OpenSSF model-signing bundles made at add time, checked under each policy."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from model_signing import verifying
from sqlalchemy import create_engine, text

from auto_glm.registry import (
    IntegrityError,
    ModelRegistry,
    RegistryError,
    SignatureError,
    generate_key_pair,
)
from auto_glm.registry.signing import fingerprint, load_public_key

Keys = tuple[Path, Path]


def test_a_good_signature_verifies_with_the_trusted_key(
    sqlite_registry: ModelRegistry, model_dir: Path, keys: Keys
) -> None:
    mv = sqlite_registry.add("glm", model_dir, "1", sign_key=keys[0])
    assert mv.signer == fingerprint(load_public_key(keys[1]))
    assert (model_dir / "model.sig").exists() is False  # the bundle lives in the database
    report = sqlite_registry.verify(mv, signatures="required", trusted_keys=[keys[1]])
    assert report.signed_by == mv.signer
    assert sqlite_registry.get("glm", "1").signature == mv.signature


def test_unsigned_versions_pass_optional_and_are_refused_when_required(
    sqlite_registry: ModelRegistry, model_dir: Path, keys: Keys
) -> None:
    mv = sqlite_registry.add("glm", model_dir, "1")
    assert sqlite_registry.verify(mv, trusted_keys=[keys[1]]).signed_by is None
    with pytest.raises(SignatureError) as caught:
        sqlite_registry.verify(mv, signatures="required", trusted_keys=[keys[1]])
    assert str(caught.value) == (
        "glm@1 has no signature and verify_signatures is required; sign it with "
        "`autoglm models sign glm@1 --sign-key KEY`, or set the policy to optional"
    )


def test_a_signature_by_an_untrusted_key_is_refused(
    sqlite_registry: ModelRegistry, model_dir: Path, keys: Keys, other_keys: Keys
) -> None:
    mv = sqlite_registry.add("glm", model_dir, "1", sign_key=other_keys[0])
    for policy in ("optional", "required"):
        with pytest.raises(SignatureError) as caught:
            sqlite_registry.verify(mv, signatures=policy, trusted_keys=[keys[1]])
        message = str(caught.value)
        assert message.startswith(
            f"signature of glm@1 does not verify with any trusted key (keys: {keys[1]} "
            f"(sha256:{fingerprint(load_public_key(keys[1]))[:16]})); it names "
            f"sha256:{str(mv.signer)[:16]} as its signer"
        )
    report = sqlite_registry.verify(
        mv, signatures="required", trusted_keys=keys[1:] + other_keys[1:]
    )
    assert report.signed_by == mv.signer


def test_policy_off_and_missing_keys(
    sqlite_registry: ModelRegistry, model_dir: Path, keys: Keys, other_keys: Keys
) -> None:
    mv = sqlite_registry.add("glm", model_dir, "1", sign_key=other_keys[0])
    assert sqlite_registry.verify(mv, signatures="off", trusted_keys=[keys[1]]).signed_by is None
    assert sqlite_registry.verify(mv).signed_by is None  # optional, nothing to check with
    with pytest.raises(SignatureError, match="no trusted public key was given and verify_sig"):
        sqlite_registry.verify(mv, signatures="required")
    with pytest.raises(RegistryError, match="policy 'strict' is invalid: use off, optional or"):
        sqlite_registry.verify(mv, signatures="strict")


def test_a_manifest_changed_in_the_database_breaks_the_signature(
    sqlite_registry: ModelRegistry, sqlite_url: str, model_dir: Path, keys: Keys
) -> None:
    """An attacker who swaps the weights and rewrites the stored manifest to match."""
    mv = sqlite_registry.add("glm", model_dir, "1", sign_key=keys[0])
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"\1" * weights.stat().st_size)
    forged = json.loads(mv.manifest.to_json())
    for entry in forged["files"]:
        if entry["path"] == "model.safetensors":
            entry["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    engine = create_engine(sqlite_url)
    with engine.begin() as db:
        db.execute(text("UPDATE model_versions SET manifest = :m"), {"m": json.dumps(forged)})
    engine.dispose()
    forged_mv = sqlite_registry.get("glm", "1")
    with pytest.raises(SignatureError, match="signature of glm@1 does not match its manifest"):
        sqlite_registry.verify(forged_mv, signatures="required", trusted_keys=[keys[1]])


def test_a_signature_copied_from_another_version_is_refused(
    sqlite_registry: ModelRegistry, sqlite_url: str, model_dir: Path, keys: Keys
) -> None:
    signed = sqlite_registry.add("glm", model_dir, "1", sign_key=keys[0])
    sqlite_registry.add("glm", model_dir, "2")
    engine = create_engine(sqlite_url)
    with engine.begin() as db:
        db.execute(
            text("UPDATE model_versions SET signature = :s WHERE version = '2'"),
            {"s": signed.signature},
        )
    engine.dispose()
    with pytest.raises(SignatureError, match="signature of glm@2 was made for glm@1"):
        sqlite_registry.verify(
            sqlite_registry.get("glm", "2"), signatures="required", trusted_keys=[keys[1]]
        )


def test_our_bundle_verifies_with_model_signing_itself(
    sqlite_registry: ModelRegistry, model_dir: Path, keys: Keys, tmp_path: Path
) -> None:
    mv = sqlite_registry.add("glm", model_dir, "1", sign_key=keys[0])
    bundle = tmp_path / "glm.sig"
    bundle.write_text(mv.signature or "")
    verifying.Config().use_elliptic_key_verifier(public_key=keys[1]).verify(model_dir, bundle)
    (model_dir / "evil.py").write_text("x")
    with pytest.raises(ValueError, match="Extra files found"):
        verifying.Config().use_elliptic_key_verifier(public_key=keys[1]).verify(model_dir, bundle)


def test_sign_signs_an_existing_version_after_checking_its_files(
    sqlite_registry: ModelRegistry, model_dir: Path, keys: Keys
) -> None:
    sqlite_registry.add("glm", model_dir, "1")
    signed = sqlite_registry.sign("glm", "1", keys[0])
    assert sqlite_registry.verify(signed, signatures="required", trusted_keys=[keys[1]]).signed_by
    (model_dir / "evil.py").write_text("x")
    with pytest.raises(IntegrityError, match="unexpected file 'evil.py'"):
        sqlite_registry.sign("glm", "1", keys[0])


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    private, public = generate_key_pair(tmp_path / "new")
    assert (private.name, public.name) == ("signing-key.pem", "signing-key.pub.pem")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes()
    assert b"BEGIN PUBLIC KEY" in public.read_bytes()
    with pytest.raises(RegistryError, match="already exists: keygen never overwrites a key"):
        generate_key_pair(tmp_path / "new")


def test_unusable_signing_keys_are_refused_before_hashing(
    sqlite_registry: ModelRegistry, model_dir: Path, keys: Keys, tmp_path: Path
) -> None:
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    cases = {
        encrypted: "is encrypted; use an unencrypted one",
        keys[1]: "is not a PEM private key: give the private key",
        tmp_path / "missing.pem": "cannot read the signing key",
        rsa_key: "not an elliptic-curve key",
    }
    for key, message in cases.items():
        with pytest.raises(RegistryError, match=message):
            sqlite_registry.add("glm", model_dir, "1", sign_key=key)
    assert sqlite_registry.names() == []
