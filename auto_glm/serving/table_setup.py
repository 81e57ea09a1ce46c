"""The model table ``autoglm serve`` starts with: one ``--model``, or ``--serve`` entries of
the model registry, each version verified and loaded before the server listens."""

from __future__ import annotations

from pathlib import Path

from auto_glm.checkpoints import demo_model_path
from auto_glm.fleet import LoadSettings, ModelTable, PathSource, RegisteredSource, ServeSpec
from auto_glm.fleet.spec import parse_duration
from auto_glm.serving.config import ServerConfig

__all__ = ["build_table", "load_settings"]


def load_settings(config: ServerConfig, has_tenants: bool = False) -> LoadSettings:
    return LoadSettings(
        device=config.device,
        dtype=config.dtype,
        compute_dtype=config.compute_dtype,
        quantization=config.quantization,
        engine_options=config.engine_options(has_tenants),
        signatures=config.verify_signatures,
        trusted_keys=tuple(Path(key) for key in config.trusted_keys),
        engine_process=config.engine_process,
    )


def build_table(config: ServerConfig, has_tenants: bool = False) -> ModelTable:
    """The table of ``config``'s models, loaded (raises ModelLoadError, RegistryError...)."""
    settings = load_settings(config, has_tenants)
    keep_alive = parse_duration(config.keep_alive, "keep_alive") if config.keep_alive else None
    kv_memory = int(config.kv_cache_memory) if config.kv_cache_memory else None
    if not config.serve:
        path = config.model_name_or_path or str(demo_model_path())
        table = ModelTable(settings, kv_cache_memory=kv_memory)
        name = config.served_model_name or Path(path).name
        table.add(name, [PathSource(path, settings)], keep_alive=keep_alive)
    else:
        from auto_glm.registry import ModelRegistry

        registry = ModelRegistry(config.database_url, config.registry_dir)

        def lookup(name: str, version: str) -> RegisteredSource:
            return RegisteredSource(registry, registry.get(name, version), settings)

        table = ModelTable(settings, lookup, kv_cache_memory=kv_memory)
        table.closing.append(registry.close)
        for spec in map(ServeSpec.parse, config.serve):
            source = RegisteredSource(registry, registry.get(spec.name, spec.version), settings)
            table.add(
                spec.name,
                [source],
                keep_alive=spec.keep_alive if spec.keep_alive is not None else keep_alive,
                kv_share=spec.kv_share,
            )
    try:
        table.load_initial()
    except BaseException:
        table.close()
        raise
    return table
