"""The KV-state cache: token-exact keys, the prefix index and the KVC v2 row format (tiers, writer, policy follow).

Pure Python: nothing here touches native code, so the cache is built and property-tested on its own.
"""

from erllama.cache.index import PrefixHit, PrefixIndex
from erllama.cache.key import (
    BLOCK_TOKENS,
    KEY_SCHEME,
    BlockHash,
    CacheKey,
    FingerprintMode,
    Namespace,
    block_chain,
    cache_key,
    ctx_params_hash,
    fingerprint,
    prefix_keys,
)
from erllama.cache.kvc import RowMeta, SaveReason, read_meta, read_row

__all__ = [
    "BLOCK_TOKENS",
    "KEY_SCHEME",
    "BlockHash",
    "CacheKey",
    "FingerprintMode",
    "Namespace",
    "PrefixHit",
    "PrefixIndex",
    "RowMeta",
    "SaveReason",
    "block_chain",
    "cache_key",
    "ctx_params_hash",
    "fingerprint",
    "prefix_keys",
    "read_meta",
    "read_row",
]
