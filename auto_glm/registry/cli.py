"""``autoglm models``: register model versions, list them, and check their files and signatures.

Every action takes ``--database URL`` (default ``$AUTOGLM_DATABASE_URL``, else the tenant
store's SQLite file) and ``--registry DIR`` (where ``--copy`` puts files; default
``$AUTOGLM_REGISTRY_DIR``, else ``$AUTOGLM_HOME/models``), before or after its name. Exit
status: 0 done, 1 a file or signature check failed (each problem on its own line), 2 the
request was refused (one line naming the problem and the fix).

To add an action from another module, add it to the subparsers that :func:`configure`
returns, with :func:`~auto_glm.registry.commands.add_command`, e.g. in ``auto_glm/cli.py``::

    commands = configure(parser)
    configure_traffic(add_command(commands, "traffic", "HELP", run_traffic))
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from auto_glm.registry.commands import (
    add_command,
    add_global_options,
    open_registry,
    progress,
    run,
)
from auto_glm.registry.hashing import VerifyReport
from auto_glm.registry.models import ModelVersion, parse_ref, split_ref
from auto_glm.registry.signing import POLICIES, fingerprint, generate_key_pair, load_public_key
from auto_glm.registry.signing import short as short_key

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """Add the ``models`` actions to ``parser``; returns the subparsers, for more actions."""
    add_global_options(parser)
    commands = parser.add_subparsers(metavar="ACTION", title="actions", required=True)
    add = add_command(commands, "add", "register a model directory as NAME, version V", _add)
    add.add_argument("name", metavar="NAME", help="1 to 64 of A-Z, a-z, 0-9, '.', '_', '-'")
    add.add_argument("path", metavar="PATH", help="the model directory (holding config.json)")
    add.add_argument("--version", required=True, metavar="V", help="same rule as NAME")
    add.add_argument("--sign-key", type=Path, metavar="KEY", help="sign with this private key")
    add.add_argument(
        "--copy",
        action="store_true",
        help="copy the files into the registry directory first (removed with the version)",
    )
    add_command(commands, "list", "list every version of every model", _list)
    show = add_command(
        commands, "show", "show a model's versions (or one: NAME@V) and their manifests", _show
    )
    show.add_argument("ref", metavar="NAME[@V]")
    remove = add_command(
        commands, "remove", "forget a version (and delete the files if they were copied)", _remove
    )
    remove.add_argument("ref", metavar="NAME@V")
    verify = add_command(
        commands, "verify", "check a version's files and signature (default: the latest)", _verify
    )
    verify.add_argument("ref", metavar="NAME[@V]")
    verify.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        default=[],
        metavar="PUB",
        help="a trusted public key (PEM); repeatable",
    )
    verify.add_argument(
        "--signatures",
        choices=POLICIES,
        default="optional",
        help="off: skip; optional (default): check signed versions when keys are given; "
        "required: refuse unsigned versions and signatures no trusted key made",
    )
    sign = add_command(commands, "sign", "sign a registered version (after checking it)", _sign)
    sign.add_argument("ref", metavar="NAME@V")
    sign.add_argument("--sign-key", type=Path, required=True, metavar="KEY")
    keygen = add_command(
        commands,
        "keygen",
        "write a signing key pair (EC P-256) into DIR",
        _keygen,
        registry_options=False,
    )
    keygen.add_argument("directory", type=Path, metavar="DIR")
    return commands


# Output


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _signed(mv: ModelVersion) -> str:
    return short_key(mv.signer) if mv.signature else "unsigned"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    cells = [list(headers), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _describe(mv: ModelVersion, latest: bool) -> None:
    where = "copied into the registry" if mv.copied else "the source directory, not copied"
    lines = {
        "version": mv.version + (" (latest)" if latest else ""),
        "added": f"{mv.created_at:%Y-%m-%d %H:%M} UTC",
        "files": f"{len(mv.manifest.files)} ({_size(mv.total_bytes)}, {mv.total_bytes} bytes)",
        "architecture": mv.architecture or "unknown",
        "dtype": mv.dtype or "unknown",
        "signed by": f"key {mv.signer}" if mv.signature else "unsigned",
        "path": f"{mv.path} ({where})",
        "source": mv.source,
    }
    for label, value in lines.items():
        print(f"  {label + ':':<14}{value}")


def _outcome(report: VerifyReport, args: argparse.Namespace, mv: ModelVersion) -> str:
    if report.signed_by is not None:
        return f"verified, signed by {short_key(report.signed_by)}"
    if args.signatures == "off":
        return "not checked (--signatures off)"
    if mv.signature is None:
        return "none (unsigned)"
    return f"not checked (signed by {short_key(mv.signer)}; pass --trusted-key to check it)"


# Actions


def _add(args: argparse.Namespace) -> None:
    with open_registry(args) as registry:
        mv = registry.add(
            args.name,
            args.path,
            args.version,
            sign_key=args.sign_key,
            copy=args.copy,
            progress=progress(f"hashing {args.name}@{args.version}"),
        )
    print(
        f"Added {mv.ref}: {len(mv.manifest.files)} files, {_size(mv.total_bytes)}, "
        f"{mv.architecture or 'unknown architecture'}, {mv.dtype or 'unknown dtype'}, "
        f"{_signed(mv)}; files in {mv.path}" + (" (copied)" if mv.copied else "")
    )


def _list(args: argparse.Namespace) -> None:
    with open_registry(args) as registry:
        versions = [mv for name in registry.names() for mv in registry.versions(name)]
    if not versions:
        print("No models registered yet: add one with `autoglm models add NAME PATH --version V`.")
        return
    headers = ["NAME", "VERSION", "FILES", "SIZE", "ARCHITECTURE", "DTYPE", "SIGNED", "ADDED"]
    rows = [
        [
            mv.name,
            mv.version,
            str(len(mv.manifest.files)),
            _size(mv.total_bytes),
            mv.architecture or "-",
            mv.dtype or "-",
            _signed(mv),
            f"{mv.created_at:%Y-%m-%d %H:%M} UTC",
        ]
        for mv in versions
    ]
    _table(headers, rows)


def _show(args: argparse.Namespace) -> None:
    name, version = split_ref(args.ref)
    with open_registry(args) as registry:
        versions = registry.versions(name)
        if version is not None:
            versions = [registry.get(name, version)]
    print(f"model: {name} ({len(versions)} version{'s' if len(versions) != 1 else ''})")
    for index, mv in enumerate(versions):
        print()
        _describe(mv, latest=index == len(versions) - 1)


def _remove(args: argparse.Namespace) -> None:
    name, version = parse_ref(args.ref)
    with open_registry(args) as registry:
        mv = registry.remove(name, version)
    if mv.copied:
        print(f"Removed {mv.ref} and deleted its copied files in {mv.path}.")
    else:
        print(f"Removed {mv.ref}; its files in {mv.path} were not copied and are kept.")


def _verify(args: argparse.Namespace) -> None:
    name, version = split_ref(args.ref)
    with open_registry(args) as registry:
        mv = registry.get(name, version)
        report = registry.verify(
            mv,
            signatures=args.signatures,
            trusted_keys=args.trusted_key,
            progress=progress(f"verifying {mv.ref}"),
        )
    rate = report.bytes / 2**30 / report.seconds if report.seconds > 0 else 0.0
    print(
        f"OK {mv.ref}: {report.files} files, {report.bytes} bytes ({_size(report.bytes)}) "
        f"in {report.seconds:.2f} s ({rate:.2f} GiB/s); signature: {_outcome(report, args, mv)}"
    )


def _sign(args: argparse.Namespace) -> None:
    name, version = parse_ref(args.ref)
    with open_registry(args) as registry:
        mv = registry.sign(name, version, args.sign_key, progress=progress(f"checking {args.ref}"))
    print(f"Signed {mv.ref} with key {mv.signer}.")


def _keygen(args: argparse.Namespace) -> None:
    private, public = generate_key_pair(args.directory)
    print(f"Wrote the private key {private} (mode 0600: keep it secret; sign with --sign-key).")
    print(f"Wrote the public key {public} (give it to verifiers: --trusted-key).")
    print(f"Key fingerprint: {fingerprint(load_public_key(public))}")
