"""The latent and text-embedding cache: image sources encoded once, read lazily from disk.

An entry is keyed by what it was made from (``key``: the VAE, the text encoders, the data's
content identity, the resolution and the crop), written in whole shards (``shards``) by
``build``, and read as training examples (``examples.CachedExamples``), with batches drawn
ahead by worker processes (``prefetch``). The first run that needs an entry fills it; so does
``hypersd cache``.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypersd.distill.cache import shards
from hypersd.distill.cache.key import cache_key, key_parts
from hypersd.errors import UserError
from hypersd.files import check_writable, writing


def cache_root(settings) -> Path:
    """The folder of every entry: ``data.cache_dir``, else $HYPERSD_CACHE, else ~/.cache/hypersd/latents."""
    return Path(settings.cache_dir or os.environ.get("HYPERSD_CACHE") or
                Path.home() / ".cache" / "hypersd" / "latents").expanduser()


def ensure_cache(pipe, settings, build: bool = True) -> tuple[Path, bool]:
    """The entry for ``settings``' source and ``pipe``, built first unless it is whole (or
    ``build`` is False); returns its folder and whether it is whole."""
    from hypersd.distill.family import family_of
    from hypersd.distill.sources import open_source
    family, source = family_of(pipe), open_source(settings)
    parts = key_parts(pipe, family, source.identity(), settings)
    folder = cache_root(settings) / cache_key(parts)
    if (folder / shards.INDEX).is_file() or not build:
        return folder, (folder / shards.INDEX).is_file()
    check_writable(folder.parent, "data.cache_dir")
    from hypersd.distill.cache.build import build as build_entry
    with writing(folder, "data.cache_dir"):
        build_entry(folder, pipe, family, source, settings, parts)
    return folder, True


def cached_examples(pipe, settings, accelerator=None):
    """Training examples from ``settings``' cached entry, which the main process builds if it
    must; batches are drawn ahead by ``settings.num_workers`` processes (0: none)."""
    from hypersd.distill.cache.examples import CachedExamples
    from hypersd.distill.cache.prefetch import Prefetched
    main = accelerator is None or accelerator.is_main_process
    folder, whole = ensure_cache(pipe, settings, build=main)
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()  # the main process has built it
        whole = (folder / shards.INDEX).is_file()
    if not whole:
        raise UserError(f"the latent cache {folder} was not built: run `hypersd cache` first")
    examples = CachedExamples(folder, pipe.vae.config, settings.caption_dropout, pipe.vae.device)
    return Prefetched(examples, settings.num_workers) if settings.num_workers else examples
