"""``autoglm serve``: load a model and serve it until SIGTERM/SIGINT (exit status 0).

Every :class:`ServerConfig` field is a flag (``max_num_seqs`` -> ``--max-num-seqs``); flags
override ``AUTOGLM_*`` variables, which override ``--config FILE``. ``python -m
auto_glm.serving`` runs the same command without the top-level ``autoglm`` program.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from auto_glm.serving.config import ENV_PREFIX, ConfigError, ServerConfig, load_config
from auto_glm.serving.startup import ListenError, check_listen_address

__all__ = ["configure_serve", "main", "serve_command"]

# flags with a shorter spelling than the field name
_ALIASES = {"model_name_or_path": ["--model"], "registry_dir": ["--registry"]}
_REPEATED = {"serve"}  # flags given once per value


def configure_serve(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``serve`` options to ``parser``; run the parsed args with ``serve_command``."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get(f"{ENV_PREFIX}CONFIG"),
        help=f"YAML settings file (default: ${ENV_PREFIX}CONFIG); see config.example.yaml",
    )
    for name, field in ServerConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        # Values stay strings here: ServerConfig validates them, with the same messages as
        # for the file and the environment.
        # a switch (--ray) may stand alone, meaning true, or take a value (--ray false)
        switch = {"nargs": "?", "const": "true"} if field.annotation is bool else {}
        parser.add_argument(
            *_ALIASES.get(name, []),
            flag,
            dest=name,
            metavar=name.upper(),
            action="append" if name in _REPEATED else "store",
            help=f"{field.description} [env {ENV_PREFIX}{name.upper()}]",
            **switch,
        )
    return parser


def _listen_sources(
    config: ServerConfig, overrides: dict[str, str | None], path: str | None
) -> dict[str, str]:
    """Where ``host`` and ``port`` came from, as the configuration error messages say it."""
    sources = {}
    for name in ("host", "port", "grpc_port"):
        if overrides.get(name) is not None:
            sources[name] = f"--{name.replace('_', '-')}"
        elif os.environ.get(f"{ENV_PREFIX}{name.upper()}"):
            sources[name] = f"${ENV_PREFIX}{name.upper()}"
        elif path is not None and getattr(config, name) != ServerConfig.model_fields[name].default:
            sources[name] = path
        else:
            sources[name] = "default"
    return sources


def serve_command(args: argparse.Namespace) -> int:
    """Run the server described by parsed ``args``; returns the exit status."""
    overrides = {name: getattr(args, name, None) for name in ServerConfig.model_fields}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"autoglm serve: {exc}", file=sys.stderr)
        return 2
    # Before anything slow: a taken port must not cost a model load to find out.
    sources = _listen_sources(config, overrides, args.config)
    try:
        check_listen_address(config.host, config.port, sources)
        if config.grpc_port is not None:
            grpc = {**sources, "port": sources["grpc_port"], "setting": "grpc_port"}
            check_listen_address(config.host, config.grpc_port, grpc)
    except ListenError as exc:
        print(f"autoglm serve: {exc}", file=sys.stderr)
        return 1
    # imported here: `autoglm --help` must not wait for torch and transformers
    from auto_glm.loader import ModelLoadError
    from auto_glm.observability import setup_logging
    from auto_glm.registry import RegistryError
    from auto_glm.serving.service import GLMService
    from auto_glm.serving.table_setup import build_table
    from auto_glm.tenants import TenantStore, TenantStoreError

    setup_logging(config.log_level, config.log_format)
    try:
        with TenantStore(config.database_url) as store:
            has_tenants = bool(store.list_tenants())
    except TenantStoreError as exc:
        print(f"autoglm serve: cannot open the tenant store: {exc}", file=sys.stderr)
        return 1
    if config.ray:
        from auto_glm.cluster.launch import serve_on_ray

        return serve_on_ray(config, has_tenants)
    try:
        table = build_table(config, has_tenants)
    except (ModelLoadError, RegistryError, ValueError) as exc:
        print(f"autoglm serve: cannot load the model: {exc}", file=sys.stderr)
        return 1
    GLMService(table=table, config=config).run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = configure_serve(
        argparse.ArgumentParser(
            prog="autoglm serve",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    args = parser.parse_args(argv)
    return serve_command(args)
