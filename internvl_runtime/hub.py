"""Where a checkpoint reference points: an existing folder as it is, else a Hugging Face Hub id fetched
into huggingface_hub's cache.

Everything that accepts a checkpoint folder (``loading.load_model``, ``AutoModel``/``AutoTokenizer``,
``LLMEngine.from_pretrained`` and through it the pipeline, ``internvl serve/chat/generate``) asks
``resolve_checkpoint`` for the folder, as transformers' ``from_pretrained`` does:

1. A path that exists is used as it is, so a local folder always wins over a same-named hub id.
2. Otherwise a valid hub id (``owner/name``) is fetched with ``huggingface_hub.snapshot_download``: its
   cache (``cache_dir``, else ``$HF_HUB_CACHE``, else huggingface_hub's default), ``revision``, ``token``,
   ``local_files_only`` / ``HF_HUB_OFFLINE``, its own progress bars and its resumable downloads. Only what
   the loader reads is fetched (``MODEL_FILES``): never the checkpoint's ``*.py`` (we never run code from a
   checkpoint), and pickled ``pytorch_model*.bin`` only with ``allow_pickle`` and only when the revision has
   no safetensors. ``AutoTokenizer`` fetches only the tokenizer's files (``TOKENIZER_FILES``).
3. Anything else, and every failure of the hub (offline without a cached copy, an unknown repository or
   revision, a gated one), is one ``CheckpointNotFound`` that names the id, the revision and the cache.

huggingface_hub reads ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` once, when it is imported; they are read here
again on every call, so that setting them before the load is enough, whenever huggingface_hub was imported.
Folders never import huggingface_hub.

Example::

    folder = resolve_checkpoint("OpenGVLab/InternVL2-1B", HubOptions(revision="main"))
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from .errors import CheckpointNotFound
from .version import __version__

logger = logging.getLogger(__name__)

_TOKENIZER = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
              "tokenizer.json", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja")
#: What the tokenizer reads (one of the three vocabularies, its config and the older special-token files),
#: the chat template files newer repositories keep beside it, and the model's config.
TOKENIZER_FILES: tuple[str, ...] = ("config.json", *_TOKENIZER)
#: What ``load_model`` and the engine read: config, safetensors weights (single file or index + shards),
#: the tokenizer and the generation config; an HF-format folder's processor settings (tiling, tokens per tile). No
#: ``*.py``, no pickles.
MODEL_FILES: tuple[str, ...] = ("config.json", "generation_config.json", "*.safetensors",
                                "model.safetensors.index.json", "preprocessor_config.json", "processor_config.json",
                                *_TOKENIZER)
#: Pickled weights, fetched only with ``allow_pickle`` and only when a revision has no safetensors.
PICKLED_FILES: tuple[str, ...] = ("pytorch_model*.bin", "pytorch_model.bin.index.json")

# huggingface_hub's own rule for repository names (``validate_repo_id``), restricted to ``owner/name``:
# word characters, "-" and "." in each part, starting and ending with a word character, no "--" or "..".
_HUB_ID = re.compile(r"^\w(?:[\w.-]*\w)?/\w(?:[\w.-]*\w)?$")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class HubOptions:
    """How to fetch a hub id: the keywords of transformers' ``from_pretrained`` that find the checkpoint.

    ``revision``: a branch, tag or 40-hex commit (default: ``main``). ``cache_dir``: huggingface_hub's cache
    folder (default: ``$HF_HUB_CACHE``, else its default, ``~/.cache/huggingface/hub``). ``token``: for private
    or gated repositories (default: ``$HF_TOKEN`` or the stored login). ``local_files_only``: use only the
    cache, as ``HF_HUB_OFFLINE=1`` does.

    Example::

        engine = LLMEngine.from_pretrained("OpenGVLab/InternVL2-1B", hub=HubOptions(revision="v1.0"))
    """

    revision: str | None = None
    cache_dir: str | os.PathLike[str] | None = None
    token: str | bool | None = None
    local_files_only: bool = False


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is a valid Hugging Face Hub model id of the form ``owner/name``."""
    return len(text) <= 96 and "--" not in text and ".." not in text and _HUB_ID.match(text) is not None


def offline_by_environment() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it ("1", "ON", "YES", "TRUE"), read now."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def resolve_checkpoint(ref: str | os.PathLike[str], hub: HubOptions | None = None, *,
                       files: Literal["model", "tokenizer", "config"] = "model", allow_pickle: bool = False) -> Path:
    """The local folder ``ref`` names: ``ref`` itself if it exists, else the snapshot of hub id ``ref``.

    ``files``: what to fetch from the hub: the whole checkpoint (``MODEL_FILES``), the tokenizer
    (``TOKENIZER_FILES``), or ``config.json`` alone (``plan_load``'s checks come before any weight is
    fetched). ``allow_pickle``: with "model", fetch ``pytorch_model*.bin`` when the revision has no
    safetensors. Raises ``CheckpointNotFound``."""
    folder = Path(ref)
    if folder.exists():
        return folder
    name = os.fspath(ref)
    if not is_hub_id(name):
        raise CheckpointNotFound(f"checkpoint folder {name!r} does not exist (give a folder, or a Hugging Face Hub "
                                 "id such as OpenGVLab/InternVL2-1B; or download one first, e.g. `internvl download "
                                 f"OpenGVLab/InternVL2-1B --local-dir {name}`)")
    options = hub or HubOptions()
    patterns = {"model": MODEL_FILES, "tokenizer": TOKENIZER_FILES, "config": ("config.json",)}[files]
    snapshot = _snapshot(name, options, patterns)
    if allow_pickle and files == "model" and not any(snapshot.glob("*.safetensors")):
        # at the commit just fetched, so that the pickles match its config
        snapshot = _snapshot(name, replace(options, revision=snapshot.name), PICKLED_FILES)
    logger.info("%s (revision %s): %s", name, options.revision or "main", snapshot)
    return snapshot


def _snapshot(repo_id: str, options: HubOptions, patterns: tuple[str, ...]) -> Path:
    """``snapshot_download`` of ``patterns``, its failures turned into one ``CheckpointNotFound``."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub_errors
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    env_offline = offline_by_environment()
    offline = options.local_files_only or env_offline
    given = options.cache_dir or os.environ.get("HF_HUB_CACHE")
    cache = os.fspath(given) if given else None
    shown_cache = cache or constants.HF_HUB_CACHE
    revision = options.revision or "main"
    what = f"{repo_id} (revision {revision!r})"
    try:
        path = snapshot_download(repo_id, revision=options.revision, cache_dir=cache, token=options.token,
                                 local_files_only=offline, allow_patterns=list(patterns),
                                 library_name="internvl-runtime", library_version=__version__)
    except LocalEntryNotFoundError as exc:
        incomplete = getattr(hub_errors, "IncompleteSnapshotError", None)    # huggingface_hub >= 2
        if incomplete is not None and isinstance(exc, incomplete):
            raise CheckpointNotFound(f"the cached copy of {what} in {shown_cache!r} is incomplete and cannot be "
                                     f"completed now: {_first_line(exc)}") from None
        if offline:
            why = ("HF_HUB_OFFLINE is set" if env_offline else "local_files_only is set")
            undo = "unset HF_HUB_OFFLINE" if env_offline else "drop local_files_only"
            raise CheckpointNotFound(
                f"no folder {repo_id!r} exists, and the Hugging Face Hub model {what} is not in the cache "
                f"{shown_cache!r} while {why}, so it cannot be downloaded: "
                f"{undo} to download it, point HF_HUB_CACHE / cache_dir at a cache that holds it, or give a "
                "checkpoint folder") from None
        raise CheckpointNotFound(
            f"cannot reach the Hugging Face Hub to download {what}, and the cache {shown_cache!r} has no copy "
            f"({type(exc).__name__}: {_first_line(exc)}). Check the network or a proxy (HTTPS_PROXY), or give a "
            "checkpoint folder") from None
    except RevisionNotFoundError:
        raise CheckpointNotFound(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub (a branch, "
                                 "tag or commit)") from None
    except GatedRepoError:
        raise CheckpointNotFound(f"{repo_id} is gated on the Hugging Face Hub: accept its terms on the model page, "
                                 "then log in (`hf auth login`) or pass token=") from None
    except RepositoryNotFoundError:
        raise CheckpointNotFound(f"{repo_id!r} is neither a checkpoint folder nor a model on the Hugging Face Hub "
                                 "(or a private one: log in with `hf auth login` or pass token=)") from None
    except (HfHubHTTPError, OSError) as exc:   # the Hub down, a proxy error, a full disk
        raise CheckpointNotFound(f"downloading {what} into {shown_cache!r} failed: {type(exc).__name__}: "
                                 f"{_first_line(exc)}") from exc
    assert isinstance(path, str)     # a list only for dry_run
    return Path(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
